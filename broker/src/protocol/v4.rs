//! MQTT 3.1.1 ↔ the broker's packet model (the v5 structs with no properties).
//!
//! Only the packets a 3.1.1 client sends are read and only those a broker sends are
//! written; anything else is an error (read) or skipped (write), never a panic.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4 as c4;
use rumqttc::mqttbytes::QoS as QoS4;

use super::{
    ConnectReturnCode, Disconnect, DisconnectReasonCode, Filter, LastWill, Login, Packet, PubAck,
    PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason, PubRel, PubRelReason, Publish, QoS,
    RetainForwardRule, Subscribe, SubscribeReasonCode, Unsubscribe,
};

fn qos_in(q: QoS4) -> QoS {
    match q {
        QoS4::AtMostOnce => QoS::AtMostOnce,
        QoS4::AtLeastOnce => QoS::AtLeastOnce,
        QoS4::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn qos_out(q: QoS) -> QoS4 {
    match q {
        QoS::AtMostOnce => QoS4::AtMostOnce,
        QoS::AtLeastOnce => QoS4::AtLeastOnce,
        QoS::ExactlyOnce => QoS4::ExactlyOnce,
    }
}

/// Splits one 3.1.1 packet off `buf` (whose fixed header was already checked) into the model.
pub fn read(buf: &mut BytesMut) -> Result<Packet, String> {
    let packet = c4::Packet::read(buf, usize::MAX).map_err(|e| e.to_string())?;
    Ok(match packet {
        c4::Packet::Connect(c) => {
            let will = c.last_will.map(|w| LastWill {
                topic: Bytes::from(w.topic),
                message: w.message,
                qos: qos_in(w.qos),
                retain: w.retain,
                properties: None,
            });
            let login = c.login.map(|l| Login {
                username: l.username,
                password: l.password,
            });
            let connect = super::Connect {
                keep_alive: c.keep_alive,
                client_id: c.client_id,
                clean_start: c.clean_session,
                properties: None,
            };
            Packet::Connect(connect, will, login)
        }
        c4::Packet::Publish(p) => Packet::Publish(Publish {
            dup: p.dup,
            qos: qos_in(p.qos),
            retain: p.retain,
            topic: Bytes::from(p.topic),
            pkid: p.pkid,
            payload: p.payload,
            properties: None,
        }),
        c4::Packet::PubAck(a) => Packet::PubAck(PubAck {
            pkid: a.pkid,
            reason: PubAckReason::Success,
            properties: None,
        }),
        c4::Packet::PubRec(a) => Packet::PubRec(PubRec {
            pkid: a.pkid,
            reason: PubRecReason::Success,
            properties: None,
        }),
        c4::Packet::PubRel(a) => Packet::PubRel(PubRel {
            pkid: a.pkid,
            reason: PubRelReason::Success,
            properties: None,
        }),
        c4::Packet::PubComp(a) => Packet::PubComp(PubComp {
            pkid: a.pkid,
            reason: PubCompReason::Success,
            properties: None,
        }),
        c4::Packet::Subscribe(s) => Packet::Subscribe(Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| Filter {
                    path: f.path,
                    qos: qos_in(f.qos),
                    nolocal: false,
                    preserve_retain: false,
                    retain_forward_rule: RetainForwardRule::OnEverySubscribe,
                })
                .collect(),
            properties: None,
        }),
        c4::Packet::Unsubscribe(u) => Packet::Unsubscribe(Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
            properties: None,
        }),
        c4::Packet::PingReq => Packet::PingReq(super::PingReq),
        c4::Packet::Disconnect => Packet::Disconnect(Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
            properties: None,
        }),
        other => return Err(format!("a client does not send {other:?}")),
    })
}

/// Appends the 3.1.1 encoding of a broker-to-client packet (PUBLISH is written by the caller).
pub fn write(out: &mut BytesMut, packet: &Packet) {
    let packet4 = match packet {
        Packet::ConnAck(c) => c4::Packet::ConnAck(c4::ConnAck {
            session_present: c.session_present,
            code: connack_code(c.code),
        }),
        Packet::PubAck(a) => c4::Packet::PubAck(c4::PubAck { pkid: a.pkid }),
        Packet::PubRec(a) => c4::Packet::PubRec(c4::PubRec { pkid: a.pkid }),
        Packet::PubRel(a) => c4::Packet::PubRel(c4::PubRel { pkid: a.pkid }),
        Packet::PubComp(a) => c4::Packet::PubComp(c4::PubComp { pkid: a.pkid }),
        Packet::SubAck(s) => c4::Packet::SubAck(c4::SubAck {
            pkid: s.pkid,
            return_codes: s
                .return_codes
                .iter()
                .map(|code| match code {
                    SubscribeReasonCode::Success(q) => {
                        c4::SubscribeReasonCode::Success(qos_out(*q))
                    }
                    _ => c4::SubscribeReasonCode::Failure,
                })
                .collect(),
        }),
        Packet::UnsubAck(u) => c4::Packet::UnsubAck(c4::UnsubAck { pkid: u.pkid }),
        Packet::PingResp(_) => c4::Packet::PingResp,
        Packet::Publish(p) => c4::Packet::Publish(c4::Publish {
            dup: p.dup,
            qos: qos_out(p.qos),
            retain: p.retain,
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            pkid: p.pkid,
            payload: p.payload.clone(),
        }),
        // 3.1.1 has no server DISCONNECT and no AUTH: the broker just closes.
        _ => return,
    };
    if let Err(e) = packet4.write(out, usize::MAX) {
        tracing::error!("cannot encode {packet4:?}: {e}");
    }
}

/// The 3.1.1 return code closest to a v5 CONNACK reason (3.1.1 §3.2.2.3 has only five).
fn connack_code(code: ConnectReturnCode) -> c4::ConnectReturnCode {
    use ConnectReturnCode as C;
    match code {
        C::Success => c4::ConnectReturnCode::Success,
        C::RefusedProtocolVersion | C::UnsupportedProtocolVersion => {
            c4::ConnectReturnCode::RefusedProtocolVersion
        }
        C::BadClientId | C::ClientIdentifierNotValid => c4::ConnectReturnCode::BadClientId,
        C::BadUserNamePassword | C::BadAuthenticationMethod => {
            c4::ConnectReturnCode::BadUserNamePassword
        }
        C::NotAuthorized | C::Banned => c4::ConnectReturnCode::NotAuthorized,
        _ => c4::ConnectReturnCode::ServiceUnavailable,
    }
}
