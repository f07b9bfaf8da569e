//! The MQTT wire protocol, wrapped so the rest of the broker never names the codec crate.
//!
//! One packet model serves both protocol versions: the MQTT 5.0 packet structs of the
//! `mqttbytes` code maintained inside `rumqttc` (re-exported below). 3.1.1 packets are
//! converted to and from that model in [`v4`], so every layer above sees one shape and
//! optional v5 properties; the encoder is chosen by the negotiated [`Version`].
//! [`framing`] checks every fixed header in one place before a body is decoded.
//! Replacing the codec means reimplementing [`codec`] and [`v4`] behind the same names.

pub mod codec;
pub mod framing;
pub mod v4;

pub use rumqttc::v5::mqttbytes::v5::{
    ConnAck, ConnAckProperties, Connect, ConnectProperties, ConnectReturnCode, Disconnect,
    DisconnectProperties, DisconnectReasonCode, Filter, LastWill, LastWillProperties, Login,
    Packet, PingReq, PingResp, PubAck, PubAckProperties, PubAckReason, PubComp, PubCompReason,
    PubRec, PubRecReason, PubRel, PubRelReason, Publish, PublishProperties, RetainForwardRule,
    SubAck, Subscribe, SubscribeReasonCode, UnsubAck, UnsubAckReason, Unsubscribe,
};
pub use rumqttc::v5::mqttbytes::QoS;

pub use codec::{read_connect, read_packet, write_packet, ConnectFrame, DecodeError};

/// The protocol version a connection negotiated in its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4).
    V311,
    /// MQTT 5.0 (protocol level 5).
    V5,
}

impl Version {
    pub fn is_v5(self) -> bool {
        self == Version::V5
    }
}

pub fn qos_from_u8(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// `packet` without its Reason String and User Properties: what a server leaves out when a
/// packet would exceed the client's Maximum Packet Size (MQTT-3.1.2-25, and each packet's
/// Reason String / User Property rules, e.g. MQTT-3.2.2-19/-20, MQTT-3.14.2-3/-4). `None`
/// if it has none of them (nothing to gain by encoding it again).
pub fn without_optional_properties(packet: &Packet) -> Option<Packet> {
    /// Clears both in an ack's property block; `None` if there was nothing to clear.
    macro_rules! strip_ack {
        ($variant:ident, $ack:expr) => {{
            let props = $ack.properties.as_ref()?;
            if props.reason_string.is_none() && props.user_properties.is_empty() {
                return None;
            }
            let mut ack = $ack.clone();
            // The block holds nothing else: drop it whole.
            ack.properties = None;
            Some(Packet::$variant(ack))
        }};
    }
    match packet {
        Packet::PubAck(a) => strip_ack!(PubAck, a),
        Packet::PubRec(a) => strip_ack!(PubRec, a),
        Packet::PubRel(a) => strip_ack!(PubRel, a),
        Packet::PubComp(a) => strip_ack!(PubComp, a),
        Packet::SubAck(a) => strip_ack!(SubAck, a),
        Packet::UnsubAck(a) => strip_ack!(UnsubAck, a),
        Packet::Disconnect(d) => {
            let props = d.properties.as_ref()?;
            if props.reason_string.is_none() && props.user_properties.is_empty() {
                return None;
            }
            let mut d = d.clone();
            if let Some(p) = d.properties.as_mut() {
                p.reason_string = None;
                p.user_properties.clear();
                if p.session_expiry_interval.is_none() && p.server_reference.is_none() {
                    d.properties = None;
                }
            }
            Some(Packet::Disconnect(d))
        }
        Packet::ConnAck(c) => {
            let props = c.properties.as_ref()?;
            if props.reason_string.is_none() && props.user_properties.is_empty() {
                return None;
            }
            let mut c = c.clone();
            if let Some(p) = c.properties.as_mut() {
                p.reason_string = None;
                p.user_properties.clear();
            }
            Some(Packet::ConnAck(c))
        }
        _ => None,
    }
}
