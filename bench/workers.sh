#!/usr/bin/env bash
# mqttd with 1 and 2 workers (and more: bench/workers.sh 1 2 4), 100 pairs, 64 B, QoS 0 and
# QoS 1, publishers at most 1000 messages ahead of their subscribers. Prints msgs/s, p99,
# broker CPU per message (all worker processes) and the share of messages that crossed
# workers ($SYS/broker/messages/forwarded / received). Needs: cargo build --release.
set -u
cd "$(dirname "$0")/.."
B=target/release/mqttd-bench
ulimit -n 20000
OUT=$(mktemp)
ticks() { for p in $1; do awk '{print $14+$15}' "/proc/$p/stat"; done | paste -sd+ | bc; }
for W in "${@:-1 2}"; do
  for sc in "--qos 0 --max-lead 1000" "--qos 1 --inflight 64 --max-lead 1000"; do
    target/release/mqttd --bind 127.0.0.1:0 --workers "$W" --log-level warn > "$OUT" 2>/dev/null & SP=$!
    until grep -q listening "$OUT"; do sleep 0.1; done
    PORT=$(awk '{print $4}' "$OUT" | cut -d: -f2)
    PIDS=$(pgrep -P $SP | paste -sd' ')
    T0=$(ticks "$PIDS")
    # shellcheck disable=SC2086
    RES=$($B pubsub --port "$PORT" --pairs 100 --payload 64 --duration 10 $sc 2>&1 | grep '^{')
    T1=$(ticks "$PIDS")
    sleep 1.2 # $SYS refreshes every second
    FWD=$(timeout 3 mosquitto_sub -p "$PORT" -t '$SYS/broker/messages/forwarded' -C 1)
    RCV=$(timeout 3 mosquitto_sub -p "$PORT" -t '$SYS/broker/messages/received' -C 1)
    echo "$RES" | W=$W SC="$sc" T=$((T1 - T0)) FWD=${FWD:-0} RCV=${RCV:-1} python3 -c '
import json, os, sys
d = json.loads(sys.stdin.read())
hz = os.sysconf("SC_CLK_TCK")
cpu_us = int(os.environ["T"]) / hz * 1e6 / max(d["received"], 1)
share = int(os.environ["FWD"]) / max(int(os.environ["RCV"]), 1)
w, sc, rate, p99, lost = os.environ["W"], os.environ["SC"], d["received_per_s"], d["latency_p99_us"] / 1000, d["lost"]
print(f"workers={w} {sc:40s} {rate:>12,.0f} msgs/s  p99 {p99:7.1f} ms  cpu {cpu_us:.2f} us/msg  lost {lost}  crossed {share:.0%}")'
    kill $SP; wait $SP 2>/dev/null
  done
done
rm -f "$OUT"
