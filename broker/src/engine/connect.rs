//! CONNECT: admission, client id rules, keep-alive and limits negotiation, session
//! creation, resumption and takeover, and the CONNACK.

use std::time::Instant;

use bytes::Bytes;

use super::conn::{Admission, Conn, ConnState};
use super::session::{Session, Will};
use super::{ConnKey, Engine};
use crate::model::{Message, SessionKey};
use crate::protocol::{
    ConnAck, ConnAckProperties, Connect, ConnectReturnCode, DecodeError, DisconnectReasonCode,
    LastWill, Login, Packet, Version,
};

/// Answers a CONNECT that could not be decoded: CONNACK with the reason where the version
/// is known (MQTT-3.1.2-2 / 5.0 §3.1.2.2), otherwise just close.
pub(super) fn refuse_undecodable_connect(conn: &mut Conn, e: &DecodeError) {
    let code = match e {
        DecodeError::UnsupportedProtocol(_) => {
            // Unknown level: answer in the 3.1.1 form, which every client version parses.
            conn.version = Version::V311;
            Some(ConnectReturnCode::RefusedProtocolVersion)
        }
        DecodeError::BadConnect { version, .. } => {
            conn.version = *version;
            version
                .is_v5()
                .then_some(ConnectReturnCode::MalformedPacket)
        }
        _ => None,
    };
    if let Some(code) = code {
        conn.send(&connack(false, code, None));
    }
    conn.close();
}

pub(super) fn connack(
    session_present: bool,
    code: ConnectReturnCode,
    props: Option<ConnAckProperties>,
) -> Packet {
    Packet::ConnAck(ConnAck {
        session_present,
        code,
        properties: props,
    })
}

pub(super) fn empty_connack_props() -> ConnAckProperties {
    ConnAckProperties {
        session_expiry_interval: None,
        receive_max: None,
        max_qos: None,
        retain_available: None,
        max_packet_size: None,
        assigned_client_identifier: None,
        topic_alias_max: None,
        reason_string: None,
        user_properties: Vec::new(),
        wildcard_subscription_available: None,
        subscription_identifiers_available: None,
        shared_subscription_available: None,
        server_keep_alive: None,
        response_information: None,
        server_reference: None,
        authentication_method: None,
        authentication_data: None,
    }
}

/// What negotiation settled: the session to attach to and what the CONNACK grants.
pub(super) struct Negotiated {
    pub(super) client_id: String,
    pub(super) clean_start: bool,
    /// Seconds, capped at the server's maximum.
    session_expiry: u32,
    /// None for 3.1.1, whose CONNACK has no properties.
    connack: Option<ConnAckProperties>,
}

impl Engine {
    pub(super) fn handle_connect(
        &mut self,
        key: ConnKey,
        connect: Connect,
        will: Option<LastWill>,
        login: Option<Login>,
        now: Instant,
    ) {
        let connect_bytes = self.connect_bytes.take();
        // Taken so it never outlives this CONNECT. mqttd has no authentication yet; when
        // it does, this (not `_login`, whose password the codec leaves empty) is checked.
        let _password = self.connect_password.take();
        let v5 = self.conns[key].version.is_v5();
        if !self.admit_connect(key, &connect, will.as_ref(), v5, connect_bytes) {
            return;
        }
        if self.peer_identity(key).is_some() {
            let username = self.username(key, login.as_ref()).unwrap_or_default();
            tracing::info!(conn = key, client_id = %connect.client_id, username, "CONNECT with a client certificate");
        }
        let negotiated = match self.negotiate_connect(key, connect, v5) {
            Ok(negotiated) => negotiated,
            Err((code, why)) => return self.refuse(key, code, why),
        };
        self.claim_then_accept(key, negotiated, will, now);
    }

    /// Whether this worker goes on with a CONNECT: false if it refused it (connect rate,
    /// connection or memory limit, what it carries) or handed the connection to the worker
    /// its client id lives on. The order decides which refusal a client gets.
    fn admit_connect(
        &mut self,
        key: ConnKey,
        connect: &Connect,
        will: Option<&LastWill>,
        v5: bool,
        connect_bytes: Option<Bytes>,
    ) -> bool {
        if self.conns[key].admission == Admission::RateLimited {
            // Decided where the connection arrived, before it moves to its home worker.
            self.stats.connections_refused_rate += 1;
            tracing::warn!(
                conn = key,
                "connect rate of this address exceeded: refusing CONNECT"
            );
            let code = if v5 {
                ConnectReturnCode::ConnectionRateExceeded
            } else {
                ConnectReturnCode::ServiceUnavailable
            };
            self.refuse(key, code, "connection rate exceeded");
            return false;
        }
        if self.hand_off_if_elsewhere(key, connect, connect_bytes) {
            return false;
        }
        let refusal = match self.conns[key].admission {
            Admission::OverLimit => {
                self.stats.connections_refused += 1;
                Some("connection limit reached")
            }
            Admission::OverMemory => {
                self.stats.connections_refused_memory += 1;
                Some("worker memory above its high watermark")
            }
            Admission::Admitted | Admission::RateLimited => None,
        };
        if let Some(why) = refusal {
            tracing::warn!(conn = key, "refusing CONNECT: {why}");
            let code = if v5 {
                ConnectReturnCode::QuotaExceeded
            } else {
                ConnectReturnCode::ServiceUnavailable
            };
            self.refuse(key, code, why);
            return false;
        }
        if let Err((code, why)) = self.check_connect(connect, will, v5) {
            self.refuse(key, code, why);
            return false;
        }
        true
    }

    /// Hands the connection, with the bytes of its CONNECT, to the worker its client id
    /// lives on if that is another one (the connection is then `HandingOff`, and its driver
    /// passes the socket on). True if it does.
    fn hand_off_if_elsewhere(
        &mut self,
        key: ConnKey,
        connect: &Connect,
        connect_bytes: Option<Bytes>,
    ) -> bool {
        if self.cluster.is_alone() || connect.client_id.is_empty() {
            return false;
        }
        let home = self.cluster.home_of(&connect.client_id);
        let (true, Some(bytes)) = (home != self.me, connect_bytes) else {
            return false;
        };
        // The client id lives on another worker: the whole connection moves there, so
        // takeover and session resumption stay local to one engine.
        self.conns[key].state = ConnState::HandingOff;
        self.queue_handoff(key, home, bytes);
        true
    }

    /// Settles the client id (assigned if empty), session expiry and keep-alive against the
    /// server's limits, and keeps the client's own limits in the connection.
    fn negotiate_connect(
        &mut self,
        key: ConnKey,
        connect: Connect,
        v5: bool,
    ) -> Result<Negotiated, (ConnectReturnCode, &'static str)> {
        let mut props = empty_connack_props();
        let mut client_id = connect.client_id;
        if client_id.is_empty() {
            if !v5 && !connect.clean_start {
                // MQTT-3.1.3-8: a zero-byte id needs CleanSession=1.
                return Err((
                    ConnectReturnCode::BadClientId,
                    "empty client id without clean session",
                ));
            }
            client_id = self.assign_client_id();
            if v5 {
                props.assigned_client_identifier = Some(client_id.clone());
            }
        }

        // Session expiry: v5 asks for it; 3.1.1 persistent sessions never expire.
        let limits = &self.config.limits;
        let requested_expiry = match (&connect.properties, v5) {
            (Some(p), true) => p.session_expiry_interval.unwrap_or(0),
            (None, true) => 0,
            (_, false) if connect.clean_start => 0,
            (_, false) => u32::MAX,
        };
        let expiry = requested_expiry.min(limits.max_session_expiry_secs);
        if v5 && expiry != requested_expiry {
            props.session_expiry_interval = Some(expiry);
        }

        let keep_alive = self.negotiate_keep_alive(connect.keep_alive, v5, &mut props);
        let conn = &mut self.conns[key];
        conn.keep_alive = keep_alive;
        if let Some(p) = &connect.properties {
            conn.client_receive_max = p.receive_maximum.unwrap_or(u16::MAX);
            conn.client_max_packet = p.max_packet_size.unwrap_or(u32::MAX);
            conn.client_alias_max = p.topic_alias_max.unwrap_or(0);
        }

        if v5 {
            self.announce_server_limits(&mut props);
        }
        Ok(Negotiated {
            client_id,
            clean_start: connect.clean_start,
            session_expiry: expiry,
            connack: v5.then_some(props),
        })
    }

    /// The v5 CONNACK tells the client the server's limits and which optional features it
    /// lacks, so a well-behaved client never runs into them.
    fn announce_server_limits(&self, props: &mut ConnAckProperties) {
        let cfg = &self.config;
        props.receive_max = Some(cfg.limits.receive_maximum);
        props.max_packet_size = Some(cfg.limits.max_packet_size);
        props.topic_alias_max = Some(cfg.limits.max_topic_alias);
        if cfg.mqtt.maximum_qos < 2 {
            props.max_qos = Some(cfg.mqtt.maximum_qos);
        }
        if !cfg.mqtt.retain_available {
            props.retain_available = Some(0);
        }
        if !cfg.mqtt.wildcard_subscriptions {
            props.wildcard_subscription_available = Some(0);
        }
        if !cfg.mqtt.subscription_identifiers {
            props.subscription_identifiers_available = Some(0);
        }
        if !cfg.mqtt.shared_subscriptions {
            props.shared_subscription_available = Some(0);
        }
    }

    /// Attaches the connection to its session (created, resumed or taken over), keeps the
    /// will, sends the CONNACK and resumes delivery of what the session holds.
    pub(super) fn accept_connect(
        &mut self,
        key: ConnKey,
        negotiated: Negotiated,
        will: Option<LastWill>,
        now: Instant,
    ) {
        let Negotiated {
            client_id,
            clean_start,
            session_expiry,
            connack: props,
        } = negotiated;
        let session_present = self.attach_session(key, client_id, clean_start, session_expiry, now);
        let Some(skey) = self.conns[key].session else {
            return; // attach_session always attaches one
        };
        self.sessions[skey].will = will.map(|w| Box::new(will_from(w, skey, now)));
        let conn = &mut self.conns[key];
        conn.state = ConnState::Active;
        if !conn.try_send(&connack(session_present, ConnectReturnCode::Success, props)) {
            // Even the CONNACK exceeds the client's Maximum Packet Size: it may not be sent
            // (MQTT-3.1.2-24), and a client never answered cannot go on. No will: to the
            // client the connection never started.
            self.stats.protocol_errors += 1;
            return self.end_connection(key, false, now);
        }
        tracing::debug!(conn = key, client_id = %self.sessions[skey].client_id, session_present, "connected");
        self.resume_delivery(skey, now);
    }

    /// Checks what CONNECT carries beyond the codec's own checks.
    fn check_connect(
        &self,
        connect: &Connect,
        will: Option<&LastWill>,
        v5: bool,
    ) -> Result<(), (ConnectReturnCode, &'static str)> {
        if let Some(p) = &connect.properties {
            if p.receive_maximum == Some(0) || p.max_packet_size == Some(0) {
                return Err((
                    ConnectReturnCode::ProtocolError,
                    "receive maximum or maximum packet size of 0",
                ));
            }
            if p.authentication_method.is_some() {
                return Err((
                    ConnectReturnCode::BadAuthenticationMethod,
                    "enhanced authentication is not supported",
                ));
            }
        }
        if connect.client_id.contains('\0') {
            return Err((
                ConnectReturnCode::ClientIdentifierNotValid,
                "U+0000 in the client id",
            ));
        }
        if let Some(w) = will {
            let topic_ok = std::str::from_utf8(&w.topic)
                .ok()
                .is_some_and(|t| topic_trie::validate_topic_name(t).is_ok());
            if !topic_ok {
                let code = if v5 {
                    ConnectReturnCode::TopicNameInvalid
                } else {
                    ConnectReturnCode::ServiceUnavailable
                };
                return Err((code, "invalid will topic"));
            }
            if w.qos as u8 > self.config.mqtt.maximum_qos {
                return Err((ConnectReturnCode::QoSNotSupported, "will QoS not supported"));
            }
            if w.retain && !self.config.mqtt.retain_available {
                return Err((
                    ConnectReturnCode::RetainNotSupported,
                    "retain not supported",
                ));
            }
            let utf8_declared = w
                .properties
                .as_ref()
                .and_then(|p| p.payload_format_indicator)
                == Some(1);
            if utf8_declared && std::str::from_utf8(&w.message).is_err() {
                return Err((
                    ConnectReturnCode::PayloadFormatInvalid,
                    "will payload is not UTF-8",
                ));
            }
        }
        Ok(())
    }

    fn negotiate_keep_alive(&self, asked: u16, v5: bool, props: &mut ConnAckProperties) -> u16 {
        let mqtt = &self.config.mqtt;
        if !v5 {
            return asked;
        }
        let granted = if mqtt.server_keep_alive > 0 {
            mqtt.server_keep_alive
        } else if mqtt.max_keep_alive > 0 && (asked == 0 || asked > mqtt.max_keep_alive) {
            mqtt.max_keep_alive
        } else {
            asked
        };
        if granted != asked {
            props.server_keep_alive = Some(granted);
        }
        granted
    }

    pub(super) fn refuse(&mut self, key: ConnKey, code: ConnectReturnCode, why: &str) {
        tracing::info!(conn = key, ?code, "CONNECT refused: {why}");
        let conn = &mut self.conns[key];
        conn.send(&connack(false, code, None));
        conn.close();
    }

    /// Finds or creates the session for `client_id` and attaches connection `key` to it,
    /// taking it over from another connection if needed. Returns "session present".
    fn attach_session(
        &mut self,
        key: ConnKey,
        client_id: String,
        clean_start: bool,
        expiry: u32,
        now: Instant,
    ) -> bool {
        if let Some(&skey) = self.client_ids.get(client_id.as_str()) {
            if let Some(old) = self.sessions[skey].conn {
                // MQTT-3.1.4-3: the existing connection is closed (v5: DISCONNECT 0x8E).
                tracing::info!(conn = old, client_id, "session taken over by conn {key}");
                self.stats.takeovers += 1;
                self.conns[old]
                    .disconnect(DisconnectReasonCode::SessionTakenOver, "session taken over");
                self.end_connection(old, true, now);
            }
        }
        // The takeover may have ended a session with expiry 0: look it up again.
        let existing = self.client_ids.get(client_id.as_str()).copied();
        let resumed = match existing {
            Some(skey) if !clean_start => {
                let s = &mut self.sessions[skey];
                // A new connection before the will delay passed: the will is not sent (v5 §3.1.3.2.2).
                s.will = None;
                s.will_at = None;
                s.expires_at = None;
                s.expiry_secs = expiry;
                Some(skey)
            }
            Some(skey) => {
                self.discard_session(skey, now);
                None
            }
            None => None,
        };
        let present = resumed.is_some();
        let skey = resumed.unwrap_or_else(|| {
            let id: Box<str> = client_id.into_boxed_str();
            let skey = self.sessions.insert(Session::new(id.clone(), expiry));
            self.client_ids.insert(id, skey);
            skey
        });
        self.sessions[skey].conn = Some(key);
        self.conns[key].session = Some(skey);
        present
    }
}

fn will_from(w: LastWill, origin: SessionKey, now: Instant) -> Will {
    let (delay_secs, properties, expires_at) = match w.properties {
        Some(p) => {
            let expires_at = p
                .message_expiry_interval
                .map(|s| now + std::time::Duration::from_secs(s as u64));
            let props = crate::protocol::PublishProperties {
                payload_format_indicator: p.payload_format_indicator,
                message_expiry_interval: p.message_expiry_interval,
                topic_alias: None,
                response_topic: p.response_topic,
                correlation_data: p
                    .correlation_data
                    .map(|d| bytes::Bytes::copy_from_slice(&d)),
                user_properties: p.user_properties,
                subscription_identifiers: Vec::new(),
                content_type: p.content_type,
            };
            (p.delay_interval.unwrap_or(0), Some(props), expires_at)
        }
        None => (0, None, None),
    };
    Will {
        // Copied: both are slices of the shared read buffer and the will may be kept long.
        msg: Message {
            topic: bytes::Bytes::copy_from_slice(&w.topic),
            payload: bytes::Bytes::copy_from_slice(&w.message),
            qos: w.qos,
            retain: w.retain,
            properties: properties.map(Box::new),
            expires_at,
            origin: Some(origin),
        },
        delay_secs,
    }
}
