"""Hand-built WebSocket frames and MQTT packets, for the tests that must send what no real
client sends: an MQTT packet cut across frames, several packets in one frame, text or
unmasked frames, malformed upgrade requests.

`WsConn` is a blocking RFC 6455 client over a plain or TLS socket; `Mqtt` reads MQTT
packets out of the binary frames it receives. Every read has a deadline.
"""

import base64
import hashlib
import os
import socket
import struct

from conftest import TIMEOUT

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

# MQTT control packet types (the high nibble of the first byte).
CONNACK, PUBLISH, PUBACK, SUBACK, PINGRESP = 2, 3, 4, 9, 13


# ------------------------------------------------------------- MQTT packets (3.1.1; 5 on request)
def varint(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_str(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def packet(byte1, body):
    return bytes([byte1]) + varint(len(body)) + body


def connect_packet(client_id, clean=True, v5=False, session_expiry=None):
    flags = 0x02 if clean else 0
    if not v5:
        return packet(0x10, mqtt_str("MQTT") + bytes([4, flags]) + struct.pack("!H", 60)
                      + mqtt_str(client_id))
    props = b"" if session_expiry is None else b"\x11" + struct.pack("!I", session_expiry)
    return packet(0x10, mqtt_str("MQTT") + bytes([5, flags]) + struct.pack("!H", 60)
                  + varint(len(props)) + props + mqtt_str(client_id))


def subscribe_packet(pkid, topic, qos, v5=False):
    props = b"\x00" if v5 else b""
    return packet(0x82, struct.pack("!H", pkid) + props + mqtt_str(topic) + bytes([qos]))


def publish_packet(topic, payload, qos=0, pkid=0, v5=False):
    body = mqtt_str(topic) + (struct.pack("!H", pkid) if qos else b"")
    body += (b"\x00" if v5 else b"") + payload
    return packet(0x30 | (qos << 1), body)


def puback_packet(pkid):
    """A PUBACK, valid in 3.1.1 and 5 (which may omit the reason code and properties)."""
    return packet(0x40, struct.pack("!H", pkid))


PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"


def parse_publish(byte1, body, v5=False):
    """(topic, qos, pkid or None, payload) of a PUBLISH packet."""
    qos = (byte1 >> 1) & 3
    tlen = struct.unpack("!H", body[:2])[0]
    topic = body[2:2 + tlen].decode()
    rest = body[2 + tlen:]
    pkid = None
    if qos:
        pkid = struct.unpack("!H", rest[:2])[0]
        rest = rest[2:]
    if v5:
        plen, used = read_varint(rest)
        rest = rest[used + plen:]
    return topic, qos, pkid, rest


def read_varint(buf):
    """(value, bytes used) of the variable byte integer at the start of buf; (None, 0) if
    it is not complete yet."""
    value, shift = 0, 0
    for i, b in enumerate(buf[:4]):
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i + 1
    return None, 0


def split_packets(buf):
    """Removes the complete MQTT packets at the front of bytearray buf: [(byte1, body)]."""
    out = []
    while len(buf) >= 2:
        length, used = read_varint(buf[1:])
        if length is None or len(buf) < 1 + used + length:
            break
        out.append((buf[0], bytes(buf[1 + used:1 + used + length])))
        del buf[:1 + used + length]
    return out


# ------------------------------------------------------------------------ WebSocket client
def frame(opcode, payload=b"", fin=True, masked=True):
    """One client frame (masked, as RFC 6455 requires of clients, unless masked=False)."""
    head = bytearray([(0x80 if fin else 0) | opcode])
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head.append(mask_bit | n)
    elif n < 65536:
        head.append(mask_bit | 126)
        head += struct.pack("!H", n)
    else:
        head.append(mask_bit | 127)
        head += struct.pack("!Q", n)
    if not masked:
        return bytes(head) + payload
    key = os.urandom(4)
    return bytes(head) + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def upgrade_request(host, port, path="/mqtt", protocols="mqtt", key=None, method="GET",
                    extra=b"", omit=()):
    """The bytes of an upgrade request; `omit` drops headers by name, `extra` adds lines."""
    key = key or base64.b64encode(os.urandom(16)).decode()
    headers = [("Host", f"{host}:{port}"), ("Upgrade", "websocket"), ("Connection", "Upgrade"),
               ("Sec-WebSocket-Key", key), ("Sec-WebSocket-Version", "13")]
    if protocols is not None:
        headers.append(("Sec-WebSocket-Protocol", protocols))
    lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers if k not in omit]
    return ("\r\n".join(lines) + "\r\n").encode() + extra + b"\r\n"


def accept_key(key):
    return base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()


class HttpResponse:
    def __init__(self, raw):
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode(errors="replace").split("\r\n")
        self.status_line = lines[0]
        self.status = int(lines[0].split()[1])
        self.headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            self.headers[k.strip().lower()] = v.strip()


def open_socket(host, port, tls=None):
    sock = socket.create_connection((host, port), timeout=TIMEOUT)
    if tls is not None:
        sock = tls.wrap_socket(sock, server_hostname=host)
    sock.settimeout(TIMEOUT)
    return sock


def http_exchange(host, port, request, tls=None):
    """Sends a raw HTTP request, reads until the server closes (it must, after an error)
    and returns the HttpResponse."""
    with open_socket(host, port, tls) as sock:
        sock.sendall(request)
        raw = bytearray()
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break  # the server closed with our unread request bytes in its buffer
            if not chunk:
                break
            raw += chunk
    assert raw, "connection closed without an HTTP response"
    return HttpResponse(bytes(raw))


class WsConn:
    """A client WebSocket connection after a successful upgrade."""

    def __init__(self, host, port, path="/mqtt", protocols="mqtt", tls=None):
        self.sock = open_socket(host, port, tls)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(upgrade_request(host, port, path, protocols, key))
        raw = bytearray()
        while b"\r\n\r\n" not in raw:
            chunk = self.sock.recv(4096)
            assert chunk, f"closed during the upgrade: {bytes(raw)!r}"
            raw += chunk
        head, _, rest = bytes(raw).partition(b"\r\n\r\n")
        self.response = HttpResponse(head + b"\r\n\r\n")
        assert self.response.status == 101, self.response.status_line
        assert self.response.headers.get("sec-websocket-accept") == accept_key(key), (
            self.response.headers, key)
        self.buf = bytearray(rest)  # frame bytes that came with the 101

    def send(self, data):
        self.sock.sendall(data)

    def send_binary(self, payload):
        self.send(frame(OP_BINARY, payload))

    def _fill(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed")
            self.buf += chunk

    def recv_frame(self):
        """(fin, opcode, payload) of the next server frame (servers never mask)."""
        self._fill(2)
        b0, b1 = self.buf[0], self.buf[1]
        assert not b1 & 0x80, "the server masked a frame"
        n, pos = b1 & 0x7F, 2
        if n == 126:
            self._fill(4)
            n, pos = struct.unpack("!H", self.buf[2:4])[0], 4
        elif n == 127:
            self._fill(10)
            n, pos = struct.unpack("!Q", self.buf[2:10])[0], 10
        self._fill(pos + n)
        payload = bytes(self.buf[pos:pos + n])
        del self.buf[:pos + n]
        return bool(b0 & 0x80), b0 & 0x0F, payload

    def recv_close(self):
        """Reads to the server's Close frame; returns its code (None if it has none). Data
        frames before it are skipped."""
        while True:
            _, opcode, payload = self.recv_frame()
            if opcode == OP_CLOSE:
                return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None

    def wait_closed(self):
        """Waits for the server to close the TCP connection (reads return EOF)."""
        while True:
            try:
                if not self.sock.recv(65536):
                    return
            except ConnectionResetError:
                return

    def close(self):
        self.sock.close()


class Mqtt:
    """MQTT packets over a WsConn: binary frames are concatenated into one byte stream."""

    def __init__(self, ws, v5=False):
        self.ws = ws
        self.v5 = v5
        self.stream = bytearray()
        self.packets = []
        self.pongs = []

    def send(self, data):
        self.ws.send_binary(data)

    def recv(self):
        """(byte1, body) of the next MQTT packet."""
        while not self.packets:
            _, opcode, payload = self.ws.recv_frame()
            if opcode in (OP_BINARY, OP_CONT):
                self.stream += payload
                self.packets += split_packets(self.stream)
            elif opcode == OP_PONG:
                self.pongs.append(payload)
            else:
                raise AssertionError(f"unexpected frame opcode {opcode:#x} {payload!r}")
        return self.packets.pop(0)

    def expect(self, packet_type):
        byte1, body = self.recv()
        assert byte1 >> 4 == packet_type, f"expected type {packet_type}, got {byte1:#x} {body!r}"
        return byte1, body

    def connect(self, client_id, **kw):
        self.send(connect_packet(client_id, v5=self.v5, **kw))
        _, body = self.expect(CONNACK)
        assert body[1] == 0, f"CONNACK refused: {body!r}"
        return body
