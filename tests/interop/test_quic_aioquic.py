"""MQTT over QUIC with a QUIC stack we did not write: aioquic (pure Python).

A tiny MQTT 3.1.1 client over one aioquic bidirectional stream (ALPN "mqtt", EMQX's
single-stream mode) exchanges messages with a paho client over TCP, both ways, at QoS 0
and 1. The broker's certificate is the self-signed default, so verification is off.
"""

import asyncio
import ssl
import struct

import paho.mqtt.client as mqtt
import pytest

from conftest import TIMEOUT, USE_MOSQUITTO
from wsraw import mqtt_str, packet

aioquic = pytest.importorskip("aioquic")
from aioquic.asyncio import connect  # noqa: E402
from aioquic.quic.configuration import QuicConfiguration  # noqa: E402

pytestmark = pytest.mark.skipif(USE_MOSQUITTO, reason="mosquitto has no QUIC listener")


# ---------------------------------------------------------------- MQTT 3.1.1 encoding
def connect_packet(client_id):
    return packet(0x10, mqtt_str("MQTT") + bytes([4, 0x02]) + struct.pack("!H", 60)
                  + mqtt_str(client_id))


def subscribe_packet(pkid, topic, qos):
    return packet(0x82, struct.pack("!H", pkid) + mqtt_str(topic) + bytes([qos]))


def publish_packet(topic, payload, qos=0, pkid=0):
    body = mqtt_str(topic) + (struct.pack("!H", pkid) if qos else b"") + payload
    return packet(0x30 | (qos << 1), body)


class QuicMqtt:
    """One QUIC connection, one stream: the whole MQTT session."""

    def __init__(self, reader, writer):
        self.reader = reader
        self.writer = writer

    async def read_packet(self):
        byte1 = (await self.reader.readexactly(1))[0]
        length, shift = 0, 0
        while True:
            b = (await self.reader.readexactly(1))[0]
            length |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        return byte1, await self.reader.readexactly(length)

    async def expect(self, packet_type):
        byte1, body = await asyncio.wait_for(self.read_packet(), TIMEOUT)
        assert byte1 >> 4 == packet_type, f"expected type {packet_type}, got {byte1:#x} {body!r}"
        return byte1, body

    def send(self, data):
        self.writer.write(data)


async def quic_session(broker, client_id, body):
    config = QuicConfiguration(is_client=True, alpn_protocols=["mqtt"],
                               verify_mode=ssl.CERT_NONE, server_name="localhost")
    async with connect(broker.host, broker.quic_port, configuration=config) as conn:
        reader, writer = await conn.create_stream()
        client = QuicMqtt(reader, writer)
        client.send(connect_packet(client_id))
        _, connack = await client.expect(2)
        assert connack[1] == 0, f"CONNACK refused: {connack!r}"
        await body(client)
        client.send(packet(0xE0, b""))  # DISCONNECT
        writer.write_eof()


def tcp_client(broker, client_id):
    import queue
    got = queue.Queue()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=mqtt.MQTTv311)
    subscribed = queue.Queue()
    c.on_message = lambda c_, u, msg: got.put(msg)
    c.on_subscribe = lambda c_, u, mid, rcs, props: subscribed.put(mid)
    c.connect(broker.host, broker.port, 60)
    c.loop_start()
    return c, got, subscribed


def test_aioquic_client_exchanges_messages_with_tcp_client(broker):
    assert broker.quic_port, "mqttd announced no QUIC port"
    tcp, tcp_got, tcp_subscribed = tcp_client(broker, "aioquic-tcp-peer")
    try:
        _, mid = tcp.subscribe("interop/from-quic", qos=1)
        assert tcp_subscribed.get(timeout=TIMEOUT) == mid

        async def body(q):
            # QUIC subscriber, TCP publisher.
            q.send(subscribe_packet(1, "interop/from-tcp", 1))
            _, suback = await q.expect(9)
            assert suback[:2] == b"\x00\x01" and suback[2] in (0, 1), suback
            for qos in (0, 1):
                info = tcp.publish("interop/from-tcp", f"tcp-qos{qos}".encode(), qos=qos)
                info.wait_for_publish(TIMEOUT)
                byte1, pub = await q.expect(3)
                got_qos = (byte1 >> 1) & 3
                tlen = struct.unpack("!H", pub[:2])[0]
                assert pub[2:2 + tlen] == b"interop/from-tcp"
                rest = pub[2 + tlen:]
                if got_qos:
                    q.send(packet(0x40, rest[:2]))  # PUBACK
                    rest = rest[2:]
                assert rest == f"tcp-qos{qos}".encode()
                assert got_qos == qos
            # QUIC publisher, TCP subscriber.
            q.send(publish_packet("interop/from-quic", b"quic-qos0"))
            q.send(publish_packet("interop/from-quic", b"quic-qos1", qos=1, pkid=7))
            _, puback = await q.expect(4)
            assert puback == b"\x00\x07"

        asyncio.run(quic_session(broker, "aioquic-client", body))
        payloads = sorted(tcp_got.get(timeout=TIMEOUT).payload for _ in range(2))
        assert payloads == [b"quic-qos0", b"quic-qos1"]
    finally:
        tcp.disconnect()
        tcp.loop_stop()
