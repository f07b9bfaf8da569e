#!/usr/bin/env python3
"""Memory per idle connection over TLS, WebSocket and WebSocket over TLS (and plain TCP
for comparison): opens COUNT MQTT 3.1.1 connections (CONNECT, CONNACK, then silence),
and prints how much the broker's resident memory grew per connection.

Usage: bench/idle-layered.py --port P --mode tcp|tls|ws|wss --count N --pids PID[,PID...]
       [--cafile CA.pem] [--path /mqtt] [--hold SECONDS]
PIDS: the broker processes holding the connections (mqttd: its workers).
"""
import argparse
import asyncio
import base64
import os
import ssl
import struct
import time


def rss(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/statm") as f:
            total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return total


def connect_packet(client_id):
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x00" + struct.pack(">H", len(cid)) + cid
    return bytes([0x10, len(body)]) + body


def ws_frame(payload):
    # Client frames are masked (RFC 6455); a zero mask keeps the payload as is.
    return bytes([0x82, 0x80 | len(payload)]) + b"\x00\x00\x00\x00" + payload


async def open_one(args, context, i):
    tls = context if args.mode in ("tls", "wss") else None
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", args.port, ssl=tls, server_hostname="localhost" if tls else None)
    packet = connect_packet(f"idle-{os.getpid()}-{i}")
    if args.mode in ("ws", "wss"):
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET {args.path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                      "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n").encode())
        await reader.readuntil(b"\r\n\r\n")
        writer.write(ws_frame(packet))
        await reader.readexactly(2 + 4)  # frame header + CONNACK
    else:
        writer.write(packet)
        await reader.readexactly(4)
    return writer


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", choices=["tcp", "tls", "ws", "wss"], required=True)
    p.add_argument("--count", type=int, default=5000)
    p.add_argument("--pids", required=True)
    p.add_argument("--cafile")
    p.add_argument("--path", default="/mqtt")
    p.add_argument("--hold", type=float, default=2.0)
    args = p.parse_args()
    pids = [int(x) for x in args.pids.split(",")]
    context = None
    if args.mode in ("tls", "wss"):
        context = ssl.create_default_context(cafile=args.cafile)
    before = rss(pids)
    writers = []
    started = time.monotonic()
    batch = 200
    for at in range(0, args.count, batch):
        n = min(batch, args.count - at)
        try:
            writers += await asyncio.wait_for(
                asyncio.gather(*(open_one(args, context, at + i) for i in range(n))), 30)
        except (asyncio.TimeoutError, OSError) as e:
            print(f"{args.mode}: failed after {len(writers)} connections: {e!r}")
            return
    took = time.monotonic() - started
    await asyncio.sleep(args.hold)
    after = rss(pids)
    print(f"{args.mode}: {args.count} idle connections in {took:.1f} s "
          f"({args.count / took:.0f} connects/s), broker RSS +{after - before} B, "
          f"{(after - before) / args.count:.0f} B per connection")
    for w in writers:
        w.close()


asyncio.run(main())
