//! Engine tests of protocol rules at the edges of the spec: which DISCONNECT reasons
//! publish the will, reserved bits, inflight messages the client can no longer take,
//! packets shrunk or withheld to fit the client's Maximum Packet Size.

use bytes::BytesMut;

use super::tests::{publishes, will, Harness};
use crate::protocol::{Disconnect, DisconnectReasonCode, Packet, QoS};

/// A v5 client that ends with DISCONNECT `reason`: is its will published?
fn will_published_after(reason: DisconnectReasonCode) -> bool {
    let mut h = Harness::new();
    let watcher = h.connect("watcher", true, 0, None);
    h.subscribe(watcher, "wills/#", QoS::AtLeastOnce);
    let c = h.connect("c", true, 0, Some(will("wills/c", 0)));
    h.send(
        c,
        Packet::Disconnect(Disconnect {
            reason_code: reason,
            properties: None,
        }),
    );
    assert!(h.engine.is_closing(c));
    let got = h.received(watcher);
    let wills = publishes(&got);
    assert!(wills.iter().all(|p| p.topic == "wills/c"));
    !wills.is_empty()
}

#[test]
fn only_a_normal_disconnect_suppresses_the_will() {
    // v5 §3.14.4: the will is deleted only on Normal disconnection (0x00); 0x04 asks for
    // it, and any other reason a client gives is an abnormal end that publishes it.
    assert!(!will_published_after(
        DisconnectReasonCode::NormalDisconnection
    ));
    assert!(will_published_after(
        DisconnectReasonCode::DisconnectWithWillMessage
    ));
    assert!(will_published_after(DisconnectReasonCode::UnspecifiedError));
    assert!(will_published_after(
        DisconnectReasonCode::ImplementationSpecificError
    ));
}
