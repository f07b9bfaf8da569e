"""paho-mqtt interop tests run for both MQTT 3.1.1 and 5.0."""

import pytest

from conftest import VERSIONS, Properties, PacketTypes

pytestmark = pytest.mark.parametrize("version", VERSIONS)


def test_connect_connack(broker, clients, version):
    cl = clients(broker, version)
    flags, rc, _ = cl.connect()
    assert rc == 0
    assert flags.session_present is False
    cl.disconnect()


@pytest.mark.parametrize("pub_qos", [0, 1, 2])
@pytest.mark.parametrize("sub_qos", [0, 1, 2])
def test_pubsub_roundtrip(broker, connected, version, pub_qos, sub_qos):
    sub = connected(broker, version)
    rcs = sub.subscribe("rt/topic", sub_qos)
    assert [int(r.value) for r in rcs] == [sub_qos]  # granted QoS
    pub = connected(broker, version)
    payload = bytes(range(256)) * 4
    pub.publish("rt/topic", payload, qos=pub_qos)
    msg = sub.recv()
    assert msg.topic == "rt/topic"
    assert msg.payload == payload
    assert msg.qos == min(pub_qos, sub_qos)
    assert msg.retain is False


@pytest.mark.parametrize("filt,published,expected", [
    ("a/+/c", ["a/b/c", "a/b/d", "a/b/c/d", "a/c", "x/b/c"], ["a/b/c"]),
    ("a/#", ["a", "a/b", "a/b/c", "b/a", "ab"], ["a", "a/b", "a/b/c"]),
    ("+/+", ["a/b", "a", "a/b/c", "/x"], ["a/b", "/x"]),
])
def test_wildcards(broker, connected, version, filt, published, expected):
    sub = connected(broker, version)
    sub.subscribe(filt, 1)
    sub.subscribe("marker", 1)
    pub = connected(broker, version)
    for t in published:
        pub.publish(t, t.encode(), qos=1)
    pub.publish("marker", b"MARK", qos=1)
    got = [m.topic for m in sub.recv_until(b"MARK")]
    assert got == expected


def test_unsubscribe_stops_delivery(broker, connected, version):
    sub = connected(broker, version)
    sub.subscribe("u/t", 1)
    sub.subscribe("marker", 1)
    pub = connected(broker, version)
    pub.publish("u/t", b"before", qos=1)
    assert sub.recv().payload == b"before"
    sub.unsubscribe("u/t")
    pub.publish("u/t", b"after", qos=1)
    pub.publish("marker", b"MARK", qos=1)
    assert sub.recv_until(b"MARK") == []


def test_retained_delivered_and_cleared(broker, connected, version):
    pub = connected(broker, version)
    pub.publish("ret/t", b"kept", qos=1, retain=True)
    sub = connected(broker, version)
    sub.subscribe("ret/#", 1)
    msg = sub.recv()
    assert (msg.topic, msg.payload, msg.retain, msg.qos) == ("ret/t", b"kept", True, 1)
    # a live (non-subscribe-time) delivery of a retained publish: retain flag
    # is 0 for 3.1.1 and for v5 without retain-as-published
    pub.publish("ret/t", b"", qos=1, retain=True)  # clears
    msg = sub.recv()
    assert msg.payload == b"" and msg.retain is False
    # new subscriber: nothing retained any more; barrier on the same topic
    sub2 = connected(broker, version)
    sub2.subscribe("ret/t", 1)
    pub.publish("ret/t", b"MARK", qos=1)
    assert sub2.recv_until(b"MARK") == []


def test_will_on_abrupt_close(broker, connected, clients, version):
    watcher = connected(broker, version)
    watcher.subscribe("will/t", 1)
    victim = clients(broker, version,
                     will={"topic": "will/t", "payload": b"gone", "qos": 1, "retain": False})
    flags, rc, _ = victim.connect(start_loop=False)
    assert rc == 0
    victim.c.socket().close()  # no DISCONNECT
    msg = watcher.recv()
    assert (msg.topic, msg.payload) == ("will/t", b"gone")
    assert msg.qos == 1


def test_no_will_on_normal_disconnect(broker, connected, clients, version):
    watcher = connected(broker, version)
    watcher.subscribe("will/t", 1)
    victim = connected(broker, version,
                       will={"topic": "will/t", "payload": b"gone", "qos": 1, "retain": False})
    victim.disconnect()
    victim.wait_disconnect()
    pub = connected(broker, version)
    pub.publish("will/t", b"MARK", qos=1)
    assert watcher.recv_until(b"MARK") == []


def test_persistent_session_resume(broker, clients, connected, version):
    kw = {"client_id": "persist-1", "clean": False}
    if version == 5:
        kw["session_expiry"] = 300
    first = clients(broker, version, **kw)
    flags, rc, _ = first.connect()
    assert rc == 0 and flags.session_present is False
    first.subscribe("ps/t", 1)
    first.disconnect()
    first.wait_disconnect()

    pub = connected(broker, version)
    for i in range(3):
        pub.publish("ps/t", f"offline-{i}".encode(), qos=1)

    second = clients(broker, version, **kw)
    flags, rc, _ = second.connect()
    assert rc == 0
    assert flags.session_present is True
    got = [second.recv() for _ in range(3)]
    assert [(m.topic, m.payload, m.qos) for m in got] == [
        ("ps/t", f"offline-{i}".encode(), 1) for i in range(3)]
    # the subscription survived too
    pub.publish("ps/t", b"online", qos=1)
    assert second.recv().payload == b"online"


def test_qos2_exactly_once_in_order(broker, connected, version):
    sub = connected(broker, version)
    sub.subscribe("q2/t", 2)
    pub = connected(broker, version)
    infos = [pub.publish("q2/t", f"m{i}".encode(), qos=2, wait=False) for i in range(25)]
    for info in infos:
        pub._wait_ack(info.mid, "PUBCOMP")
    pub.publish("q2/t", b"MARK", qos=2)
    got = sub.recv_until(b"MARK")
    assert [m.payload for m in got] == [f"m{i}".encode() for i in range(25)]
    assert all(m.qos == 2 for m in got)


def test_offline_queue_limit(broker_factory, clients, connected, version):
    broker = broker_factory(**{"limits.max_queued_messages": 10})
    kw = {"client_id": "qlimit-1", "clean": False}
    if version == 5:
        kw["session_expiry"] = 300
    first = clients(broker, version, **kw)
    first.connect()
    first.subscribe("ql/t", 1)
    first.disconnect()
    first.wait_disconnect()
    pub = connected(broker, version)
    for i in range(30):
        pub.publish("ql/t", f"q{i}".encode(), qos=1)
    second = clients(broker, version, **kw)
    flags, rc, _ = second.connect()
    assert rc == 0 and flags.session_present is True
    pub.publish("ql/t", b"MARK", qos=1)
    got = [m.payload for m in second.recv_until(b"MARK")]
    assert 1 <= len(got) <= 10, got
    sent = [f"q{i}".encode() for i in range(30)]
    assert got == [p for p in sent if p in got]  # a subset, in order
