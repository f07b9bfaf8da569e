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
