#!/usr/bin/env python3
"""Redis memory per persistent session and per queued message (docs/PERFORMANCE.md).

Usage: bench/redis-memory.py MQTT_PORT REDIS_PORT, against an mqttd in Redis mode on an
otherwise idle Redis. Makes 1000 persistent sessions (clean session 0, 10 QoS 1
subscriptions each, then disconnected), then queues 10 QoS 1 messages of 64 B for each,
and prints the growth of Redis's `used_memory` per session and per message.
"""
import subprocess
import sys
import time

import paho.mqtt.client as mqtt

SESSIONS, MESSAGES = 1000, 10
port, redis_port = int(sys.argv[1]), sys.argv[2]


def used_memory():
    out = subprocess.check_output(["redis-cli", "-p", redis_port, "info", "memory"]).decode()
    return int(next(l for l in out.splitlines() if l.startswith("used_memory:")).split(":")[1])


base = used_memory()
for i in range(SESSIONS):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"mem-{i}", clean_session=False)
    c.connect("127.0.0.1", port)
    c.loop_start()
    c.subscribe([(f"mem/{i}/{k}", 1) for k in range(10)])
    time.sleep(0.005)
    c.disconnect()
    c.loop_stop()
time.sleep(1)
sessions = used_memory()
print(f"sessions: {SESSIONS}, bytes/session: {(sessions - base) / SESSIONS:.0f}")
p = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="mem-pub")
p.connect("127.0.0.1", port)
p.loop_start()
for _ in range(MESSAGES):
    for i in range(SESSIONS):
        p.publish(f"mem/{i}/0", b"x" * 64, qos=1).wait_for_publish()
time.sleep(1)
queued = used_memory()
print(f"queued: {SESSIONS * MESSAGES}, bytes/message (64 B payload): "
      f"{(queued - sessions) / (SESSIONS * MESSAGES):.0f}")
