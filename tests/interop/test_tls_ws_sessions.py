"""Persistent sessions across workers and transports, with paho-mqtt (and aioquic for QUIC).

- Handoff: with 4 workers, a persistent session is resumed 8 times over one transport;
  each new connection lands on a worker chosen by SO_REUSEPORT, so most resumes reach a
  worker that does not hold the session: a TCP connection is handed over, a TLS or
  WebSocket one relayed through a socketpair. QoS 1 messages published while the client
  is away must all arrive (counted).
- Takeover: one client id connects over TCP, then TLS, WebSocket, WebSocket over TLS,
  QUIC and TCP again, each connection taking the session over from the previous one
  (MQTT 5: DISCONNECT 0x8E "session taken over"). Messages published at every step, some
  while a takeover is under way, must all arrive at one of the connections (counted).
"""

import asyncio
import queue
import ssl
import time

import pytest

from conftest import TIMEOUT, USE_MOSQUITTO, VERSIONS, layered, mqtt, recv_seqs, tls_context
from wsraw import CONNACK, PUBLISH, connect_packet, parse_publish, puback_packet, split_packets

pytestmark = pytest.mark.skipif(USE_MOSQUITTO, reason="mqttd's TLS/WebSocket listeners")

RECONNECTS = 8  # at least; more while no resume has crossed workers yet (bounded)
MAX_RECONNECTS = 40
PER_ROUND = 5
SESSION_TAKEN_OVER = 0x8E
DISCONNECT_TYPE = 14


def transport_tls(pki, transport):
    return tls_context(pki.ca_a.cert_path) if transport in ("tls", "wss") else None


@pytest.mark.parametrize("transport", ["tcp", "tls", "ws", "wss"])
@pytest.mark.parametrize("version", VERSIONS)
def test_session_resumed_on_random_workers(broker_factory, pki, clients, connected,
                                           transport, version):
    broker = broker_factory(workers=4, **layered(pki))
    v5 = version == mqtt.MQTTv5
    port = broker.tcp_port if transport == "tcp" else None  # the session's host

    def session():
        return clients(broker, version, client_id=f"handoff-{transport}", clean=False,
                       session_expiry=300 if v5 else None, transport=transport,
                       tls=transport_tls(pki, transport), port=port)

    first = session()
    _, rc, _ = first.connect()
    assert rc == 0
    first.subscribe("handoff/t", 1)
    first.disconnect()
    pub = connected(broker, mqtt.MQTTv311)
    seq, round_ = 0, 0
    while round_ < RECONNECTS or (broker.metric("mqttd_handoffs_total") == 0
                                  and round_ < MAX_RECONNECTS):
        round_ += 1
        for _ in range(PER_ROUND):  # queued in the offline session
            pub.publish("handoff/t", str(seq).encode(), qos=1)
            seq += 1
        c = session()
        flags, rc, _ = c.connect()
        assert rc == 0 and flags.session_present, f"round {round_}: session lost ({rc})"
        recv_seqs(c, "handoff/t", PER_ROUND, start=seq - PER_ROUND)  # lost = 0, or it fails
        c.disconnect()
    # Some resumes landed on a worker other than the session's, and were handed over.
    assert broker.metric("mqttd_handoffs_total") >= 1


# ------------------------------------------------------------------------------ takeover
class Received:
    """Sequence numbers received by any connection of the client id."""

    def __init__(self):
        self.seqs = set()

    def drain(self, client):
        while True:
            try:
                msg = client.messages.get_nowait()
            except queue.Empty:
                return
            self.seqs.add(int(msg.payload))

    def wait_all(self, client, n):
        """Waits until 0..n-1 have all arrived, the missing ones at `client`."""
        want = set(range(n))
        end = time.monotonic() + TIMEOUT
        while not want <= self.seqs:
            try:
                msg = client.messages.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"lost {sorted(want - self.seqs)} of 0..{n - 1}") from None
            self.seqs.add(int(msg.payload))


class QuicMqtt:
    """MQTT packets over one aioquic stream."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer
        self.buf = bytearray()
        self.packets = []

    def send(self, data):
        self.writer.write(data)

    async def recv(self):
        """(packet type, first byte, body) of the next packet."""
        while not self.packets:
            chunk = await asyncio.wait_for(self.reader.read(65536), TIMEOUT)
            assert chunk, "QUIC stream closed"
            self.buf.extend(chunk)
            self.packets += split_packets(self.buf)
        byte1, body = self.packets.pop(0)
        return byte1 >> 4, byte1, body


async def quic_step(broker, publish_batch, takeover_by_tcp, received, previous):
    """The QUIC connection of the takeover chain: resumes the session (MQTT 5 over one
    aioquic stream, as in test_quic_aioquic.py), takes it over from `previous`, gets a
    batch, then is taken over by TCP (returned)."""
    from aioquic.asyncio import connect
    from aioquic.quic.configuration import QuicConfiguration

    config = QuicConfiguration(is_client=True, alpn_protocols=["mqtt"],
                               verify_mode=ssl.CERT_NONE, server_name="localhost")
    async with connect(broker.host, broker.quic_port, configuration=config) as conn:
        q = QuicMqtt(*await conn.create_stream())
        q.send(connect_packet("takeover-x", clean=False, v5=True, session_expiry=300))
        kind, _, body = await q.recv()
        assert kind == CONNACK and body[1] == 0, f"CONNACK {body!r}"
        assert body[0] & 1, "QUIC: session not present"
        rc, _, _ = await asyncio.to_thread(previous.wait_disconnect)
        assert rc == SESSION_TAKEN_OVER, f"previous connection got {rc}"
        received.drain(previous)
        want = set(await asyncio.to_thread(publish_batch))
        while not want <= received.seqs:
            kind, byte1, body = await q.recv()
            if kind == PUBLISH:
                _, qos, pkid, payload = parse_publish(byte1, body, v5=True)
                received.seqs.add(int(payload))
                if qos:
                    q.send(puback_packet(pkid))
        tcp = await asyncio.to_thread(takeover_by_tcp)
        while True:  # the takeover's DISCONNECT, maybe after redelivered messages
            kind, byte1, body = await q.recv()
            if kind == DISCONNECT_TYPE:
                assert body[:1] == bytes([SESSION_TAKEN_OVER]), body
                return tcp
            assert kind == PUBLISH, f"unexpected packet {byte1:#x}"
            received.seqs.add(int(parse_publish(byte1, body, v5=True)[3]))


def test_takeover_across_tcp_tls_ws_wss_quic(broker_factory, pki, clients, connected):
    broker = broker_factory(**layered(pki))
    pub = connected(broker, mqtt.MQTTv5)
    received = Received()
    seq = 0

    def publish_batch():
        nonlocal seq
        first = seq
        for _ in range(PER_ROUND):
            pub.publish("takeover/t", str(seq).encode(), qos=1)
            seq += 1
        return range(first, seq)

    def take_over(transport, clean=False):
        c = clients(broker, mqtt.MQTTv5, client_id="takeover-x", clean=clean,
                    session_expiry=300, transport=transport, tls=transport_tls(pki, transport),
                    port=broker.tcp_port if transport == "tcp" else None)
        flags, rc, _ = c.connect()
        assert rc == 0, f"{transport}: CONNACK {rc}"
        assert flags.session_present is not clean, f"{transport}: session present?"
        return c

    previous = take_over("tcp", clean=True)
    previous.subscribe("takeover/t", 1)
    for transport in ("tls", "ws", "wss"):
        publish_batch()  # delivered to `previous`, or redelivered after the takeover
        current = take_over(transport)
        rc, _, _ = previous.wait_disconnect()
        assert rc == SESSION_TAKEN_OVER, f"{previous.transport} got {rc}"
        received.drain(previous)
        previous = current
    received.wait_all(previous, seq)  # everything so far, the rest at the wss connection

    aioquic = pytest.importorskip("aioquic")
    assert aioquic and broker.quic_port
    previous = asyncio.run(quic_step(broker, publish_batch, lambda: take_over("tcp"),
                                     received, previous))
    publish_batch()
    received.wait_all(previous, seq)
