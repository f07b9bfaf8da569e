#!/usr/bin/env bash
# Runs the same mqttd-bench scenarios against a fresh mqttd and a fresh Mosquitto, one after
# the other on this machine, and prints one JSON line per run (prefixed by "== broker scenario").
# Usage: bench/compare.sh [seconds-per-pubsub-run]   (needs: mosquitto; cargo build --release)
set -u
cd "$(dirname "$0")/.."
DUR=${1:-10}
B=target/release/mqttd-bench
ulimit -n 20000
OUT=$(mktemp)
start_mqttd() {
  # Publishers up to 1000 messages ahead need more than the 20 KB per-connection model;
  # the peers have no per-connection byte budget, so neither does mqttd here.
  target/release/mqttd --bind 127.0.0.1:0 --log-level warn --set metrics.bind=\"127.0.0.1:0\" ${MQTTD_ARGS:---set limits.connection_memory_budget=1048576} > "$OUT" 2>/dev/null & BP=$!
  until grep -q listening "$OUT"; do sleep 0.1; done
  PORT=$(awk '{print $4}' "$OUT" | cut -d: -f2)
}
start_mosquitto() {
  PORT=$((20000 + RANDOM % 10000))
  printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_connections -1\n' "$PORT" > "$OUT.conf"
  mosquitto -c "$OUT.conf" > /dev/null 2>&1 & BP=$!
  until (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null; do sleep 0.1; done
}
for broker in mqttd mosquitto; do
  for sc in "pubsub --qos 0" "pubsub --qos 0 --max-lead 1000" "pubsub --qos 1 --inflight 64" "idle --connections 15000"; do
    "start_$broker"
    echo "== $broker $sc"
    extra=""; [[ $sc == pubsub* ]] && extra="--pairs 100 --payload 64 --duration $DUR"
    # shellcheck disable=SC2086
    $B $sc $extra --port "$PORT" --broker-pid "$BP" 2>&1 | grep '^{'
    kill "$BP"; wait "$BP" 2>/dev/null
  done
done
rm -f "$OUT" "$OUT.conf"
