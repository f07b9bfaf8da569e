//! Who a client is, as far as the broker can tell: the username of its CONNECT, or the
//! identity its transport proved (a TLS client certificate) when the listener says to use
//! that instead (`tls.use_identity_as_username`).

use super::{ConnKey, Engine};
use crate::protocol::Login;

impl Engine {
    /// `key` presented a client certificate naming `identity` (set before its CONNECT is
    /// handled).
    pub fn set_peer_identity(&mut self, key: ConnKey, identity: String) {
        if self.conns.contains(key) {
            self.peer_identities.insert(key, identity.into_boxed_str());
        }
    }

    /// The identity `key`'s transport proved, if any.
    pub fn peer_identity(&self, key: ConnKey) -> Option<&str> {
        self.peer_identities.get(&key).map(|id| &**id)
    }

    /// The username `key` connects as: its certificate's identity where the listener uses
    /// it as the username, else the one in its CONNECT.
    pub(super) fn username<'a>(
        &'a self,
        key: ConnKey,
        login: Option<&'a Login>,
    ) -> Option<&'a str> {
        let from_certificate = self.config.tls.use_identity_as_username;
        match self.peer_identity(key) {
            Some(identity) if from_certificate => Some(identity),
            _ => login.map(|l| l.username.as_str()),
        }
    }
}
