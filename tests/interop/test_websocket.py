"""MQTT over WebSocket (ws) and WebSocket over TLS (wss).

paho-mqtt's websocket transport exchanges counted QoS 1 messages with a TCP client. Raw
sockets (wsraw.py) send what no real client does: an MQTT packet cut across frames, several
packets in one frame, pings between fragments, malformed upgrade requests, text and
unmasked frames. After every refusal the broker must still serve: a client connected before
keeps its connection and gets a message, a new client connects, and no worker died.

The tests share one broker (ws, wss) per module, so each uses its own client ids and topics
and compares counters with their value before it.
"""

import os

import pytest

from conftest import (USE_MOSQUITTO, VERSIONS, assert_no_worker_died, layered, mqtt,
                      recv_seqs, start_mqttd, tls_context, wait_until)
from wsraw import (CONNACK, DISCONNECT, OP_BINARY, OP_CONT, OP_PING, OP_PONG, OP_TEXT,
                   PINGREQ, PINGRESP, PUBACK, PUBLISH, SUBACK, Mqtt, WsConn, connect_packet,
                   frame, http_exchange, parse_publish, puback_packet, publish_packet,
                   subscribe_packet, upgrade_request)

pytestmark = pytest.mark.skipif(USE_MOSQUITTO, reason="mqttd's WebSocket listeners")

N = 50  # messages per counted stream


@pytest.fixture(scope="module")
def ws_broker(tmp_path_factory, pki):
    broker = start_mqttd(tmp_path_factory.mktemp("ws-broker"), layered(pki, tls=False))
    yield broker
    assert broker.stop(), "broker exited during the tests:\n" + broker.log_tail()


def ws_client(clients, broker, pki, transport, version=mqtt.MQTTv311, **kw):
    tls = tls_context(pki.ca_a.cert_path) if transport == "wss" else None
    c = clients(broker, version, transport=transport, tls=tls, **kw)
    _, rc, _ = c.connect()
    assert rc == 0, f"CONNACK refused: {rc}"
    return c


def raw_ws(broker, pki, transport="ws", v5=False):
    tls = tls_context(pki.ca_a.cert_path) if transport == "wss" else None
    port = broker.ws_port if transport == "ws" else broker.wss_port
    return Mqtt(WsConn(broker.host, port, tls=tls), v5=v5)


@pytest.mark.parametrize("transport", ["ws", "wss"])
@pytest.mark.parametrize("version", VERSIONS)
def test_paho_websocket_qos1_counted(ws_broker, pki, clients, connected, transport, version):
    topic = f"paho/{transport}/{int(version)}"
    ws = ws_client(clients, ws_broker, pki, transport, version)
    ws.subscribe(f"{topic}/in", 1)
    tcp = connected(ws_broker, version)
    tcp.subscribe(f"{topic}/out", 1)
    for i in range(N):
        tcp.publish(f"{topic}/in", str(i).encode(), qos=1, wait=False)
        ws.publish(f"{topic}/out", str(i).encode(), qos=1, wait=False)
    recv_seqs(ws, f"{topic}/in", N)  # lost = 0, or it fails
    recv_seqs(tcp, f"{topic}/out", N)


# ---------------------------------------------------------------------------- framing
def pieces(data, n):
    """data cut into n nearly equal non-empty pieces."""
    step = -(-len(data) // n)
    return [data[i:i + step] for i in range(0, len(data), step)]


def send_split(m, data, how):
    """Sends one MQTT packet's bytes in several frames: one fragmented message (with a Ping
    between the fragments, which RFC 6455 §5.4 allows), separate messages, or one
    message per byte."""
    if how == "fragments":
        parts = pieces(data, 3)
        m.ws.send(frame(OP_BINARY, parts[0], fin=False))
        m.ws.send(frame(OP_PING, b"mid-message"))
        m.ws.send(frame(OP_CONT, parts[1], fin=False))
        m.ws.send(frame(OP_CONT, parts[2], fin=True))
    elif how == "messages":
        for part in pieces(data, 3):
            m.ws.send(frame(OP_BINARY, part))
    else:  # "bytes"
        m.ws.send(b"".join(frame(OP_BINARY, data[i:i + 1]) for i in range(len(data))))


@pytest.mark.parametrize("transport", ["ws", "wss"])
@pytest.mark.parametrize("how", ["fragments", "messages", "bytes"])
def test_packet_split_across_frames(ws_broker, pki, transport, how):
    m = raw_ws(ws_broker, pki, transport)
    topic = f"split/{how}/{transport}"
    send_split(m, connect_packet(f"split-{how}-{transport}"), how)
    _, connack = m.expect(CONNACK)
    assert connack == b"\x00\x00"
    send_split(m, subscribe_packet(1, topic, 1), how)
    _, suback = m.expect(SUBACK)
    assert suback == b"\x00\x01\x01"
    payload = bytes(range(256)) * 4  # a PUBLISH of more than one frame's worth in every case
    send_split(m, publish_packet(topic, payload, qos=1, pkid=9), how)
    got = {}
    for _ in range(2):
        byte1, body = m.recv()
        got[byte1 >> 4] = (byte1, body)
    assert got[PUBACK][1] == b"\x00\x09"
    got_topic, qos, _, echoed = parse_publish(*got[PUBLISH])
    assert (got_topic, qos, echoed) == (topic, 1, payload)
    if how == "fragments":
        assert m.pongs == [b"mid-message"] * 3  # one Ping per split packet
    m.ws.close()


@pytest.mark.parametrize("transport", ["ws", "wss"])
def test_several_packets_in_one_frame(ws_broker, pki, transport):
    m = raw_ws(ws_broker, pki, transport)
    topic = f"batch/{transport}"
    m.send(connect_packet(f"batched-{transport}") + subscribe_packet(1, topic, 1)
           + publish_packet(topic, b"one", qos=1, pkid=2)
           + publish_packet(topic, b"two", qos=1, pkid=3) + PINGREQ)
    _, connack = m.expect(CONNACK)
    assert connack == b"\x00\x00"
    _, suback = m.expect(SUBACK)
    assert suback == b"\x00\x01\x01"
    pubacks, payloads, pingresps = [], [], 0
    while len(pubacks) < 2 or len(payloads) < 2 or not pingresps:
        byte1, body = m.recv()
        kind = byte1 >> 4
        if kind == PUBACK:
            pubacks.append(body)
        elif kind == PUBLISH:
            topic, qos, pkid, payload = parse_publish(byte1, body)
            payloads.append(payload)
            m.send(puback_packet(pkid))
        else:
            assert kind == PINGRESP, f"unexpected packet {byte1:#x}"
            pingresps += 1
    assert sorted(pubacks) == [b"\x00\x02", b"\x00\x03"]
    assert payloads == [b"one", b"two"]
    m.send(DISCONNECT)
    m.ws.wait_closed()


def test_ping_gets_pong_with_same_payload(ws_broker, pki):
    m = raw_ws(ws_broker, pki)
    m.ws.send(frame(OP_PING, b"before connect"))  # answered before any MQTT, too
    fin, opcode, payload = m.ws.recv_frame()
    assert (fin, opcode, payload) == (True, OP_PONG, b"before connect")
    m.connect("pinger")
    m.ws.send(frame(OP_PING, bytes(range(125))))  # the largest control payload
    fin, opcode, payload = m.ws.recv_frame()
    assert (fin, opcode, payload) == (True, OP_PONG, bytes(range(125)))
    m.send(PINGREQ)  # and MQTT still flows
    m.expect(PINGRESP)
    m.ws.close()


# ------------------------------------------------------------- refusals; broker stays healthy
class Bystander:
    """A WebSocket client connected before a misbehaving one: afterwards it must still be
    connected and get a message (its worker did not die), and a new client must connect."""

    def __init__(self, broker, pki, clients, connected):
        self.broker, self.pki, self.clients = broker, pki, clients
        self.topic = f"health/{os.urandom(4).hex()}"
        self.sub = ws_client(clients, broker, pki, "ws")
        self.sub.subscribe(self.topic, 1)
        self.pub = connected(broker, mqtt.MQTTv311)

    def check(self):
        self.pub.publish(self.topic, b"0", qos=1)
        assert recv_seqs(self.sub, self.topic, 1) == [0]
        fresh = ws_client(self.clients, self.broker, self.pki, "ws")
        fresh.subscribe(f"{self.topic}/fresh", 1)
        fresh.publish(f"{self.topic}/fresh", b"0", qos=1)
        assert recv_seqs(fresh, f"{self.topic}/fresh", 1) == [0]
        assert_no_worker_died(self.broker)


def transport_errors(broker, reason, transport="ws"):
    return broker.metric("mqttd_transport_errors_total", transport=transport, reason=reason)


BAD_UPGRADES = [
    pytest.param(dict(path="/other"), 404, id="wrong-path"),
    pytest.param(dict(path="/mqtt/deeper"), 404, id="path-below"),
    pytest.param(dict(method="POST"), 405, id="post"),
    pytest.param(dict(omit=("Upgrade",)), 400, id="no-upgrade"),
    pytest.param(dict(omit=("Connection",)), 400, id="no-connection"),
    pytest.param(dict(omit=("Sec-WebSocket-Key",)), 400, id="no-key"),
    pytest.param(dict(omit=("Sec-WebSocket-Version",), extra=b"Sec-WebSocket-Version: 8\r\n"),
                 426, id="version-8"),
    pytest.param(dict(extra=b"X-Filler: " + b"a" * 9000 + b"\r\n"), 431, id="too-large"),
    pytest.param(dict(extra=b"".join(b"X-H%d: v\r\n" % i for i in range(80))), 431,
                 id="too-many-headers"),
    pytest.param(dict(protocols="wamp, graphql-ws"), 400, id="unsupported-subprotocols"),
]


@pytest.mark.parametrize("request_kw,status", BAD_UPGRADES)
def test_bad_upgrade_is_refused_with_http_status(ws_broker, pki, clients, connected,
                                                 request_kw, status):
    bystander = Bystander(ws_broker, pki, clients, connected)
    before = transport_errors(ws_broker, "ws_upgrade")
    request = upgrade_request(ws_broker.host, ws_broker.ws_port, **request_kw)
    response = http_exchange(ws_broker.host, ws_broker.ws_port, request)
    assert response.status == status, response.status_line
    if status == 405:
        assert response.headers.get("allow") == "GET"
    if status == 426:
        assert response.headers.get("sec-websocket-version") == "13"
    wait_until(lambda: transport_errors(ws_broker, "ws_upgrade") >= before + 1,
               "ws_upgrade counted")
    assert transport_errors(ws_broker, "ws_upgrade") == before + 1
    bystander.check()


def test_bad_upgrade_over_tls_is_refused(ws_broker, pki):
    tls = tls_context(pki.ca_a.cert_path)
    before = transport_errors(ws_broker, "ws_upgrade", "wss")
    request = upgrade_request(ws_broker.host, ws_broker.wss_port, path="/other")
    response = http_exchange(ws_broker.host, ws_broker.wss_port, request, tls=tls)
    assert response.status == 404, response.status_line
    wait_until(lambda: transport_errors(ws_broker, "ws_upgrade", "wss") == before + 1,
               "wss ws_upgrade counted")


def test_subprotocol_mqttv31_and_none_are_accepted(ws_broker, pki):
    m = Mqtt(WsConn(ws_broker.host, ws_broker.ws_port, protocols="wamp, mqttv3.1"))
    assert m.ws.response.headers.get("sec-websocket-protocol") == "mqttv3.1"
    m.connect("proto-31")
    m.ws.close()
    m = Mqtt(WsConn(ws_broker.host, ws_broker.ws_port, protocols=None))
    assert "sec-websocket-protocol" not in m.ws.response.headers
    m.connect("proto-none")
    m.ws.close()


@pytest.mark.parametrize("bad_frame,code", [
    pytest.param(frame(OP_TEXT, b'{"mqtt": "json?"}'), 1003, id="text-frame"),
    pytest.param(frame(OP_BINARY, PINGREQ, masked=False), 1002, id="unmasked-frame"),
])
def test_bad_frame_is_closed_with_code(ws_broker, pki, clients, connected, bad_frame, code):
    bystander = Bystander(ws_broker, pki, clients, connected)
    before = transport_errors(ws_broker, "ws_protocol")
    handoffs = ws_broker.metric("mqttd_handoffs_total")
    m = raw_ws(ws_broker, pki)
    m.connect(f"bad-framer-{code}")
    m.ws.send(bad_frame)
    assert m.ws.recv_close() == code
    m.ws.wait_closed()
    if ws_broker.metric("mqttd_handoffs_total") == handoffs:
        # Counted unless the connection was relayed to another worker (see the next test).
        wait_until(lambda: transport_errors(ws_broker, "ws_protocol") == before + 1,
                   "ws_protocol counted")
    bystander.check()


def test_relayed_connection_errors_are_counted(broker_factory, pki):
    """With 2 workers a connection is relayed to its client id's home worker unless
    SO_REUSEPORT happened to pick that worker: connect until one is (and 4 at least)."""
    broker = broker_factory(workers=2, **layered(pki, tls=False, wss=False))
    n = 0
    while n < 4 or (broker.metric("mqttd_handoffs_total") == 0 and n < 40):
        m = Mqtt(WsConn(broker.host, broker.ws_port))
        m.connect(f"relayed-bad-{n}")
        m.ws.send(frame(OP_TEXT, b"{}"))
        assert m.ws.recv_close() == 1003
        m.ws.wait_closed()
        n += 1
    assert broker.metric("mqttd_handoffs_total") >= 1  # some were relayed
    errors = [(labels, v) for name, labels, v in broker.metrics()
              if name == "mqttd_transport_errors_total" and v]
    assert transport_errors(broker, "ws_protocol") == n, errors
