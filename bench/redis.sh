#!/usr/bin/env bash
# The Redis backend's figures (docs/PERFORMANCE.md): 100 pub/sub pairs, 64 B, 2 workers per
# broker, against a throwaway redis-server on a free port. Prints msgs/s delivered, loss,
# p99 and, in Redis mode, messages per Redis round trip (from the publishers' broker).
# Usage: bench/redis.sh MODE QOS   (RATE=R for a fixed offered load, R msgs/s per publisher)
#   embedded          one broker, the embedded mesh only
#   redis             one broker in Redis mode
#   cross             two brokers (two hosts) on one Redis: publishers on A, subscribers on B
#   persist           one broker in Redis mode, subscribers with persistent sessions
#   persist-embedded  the same without Redis (sessions in memory only)
set -u
cd "$(dirname "$0")/.."
MODE=$1; QOS=$2
ulimit -n 20000
TMP=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
RPORT=$(free_port)
redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$TMP" > /dev/null & RP=$!
trap 'kill $RP ${A:-} ${B:-} 2>/dev/null; rm -rf "$TMP"' EXIT
until redis-cli -p "$RPORT" ping > /dev/null 2>&1; do sleep 0.1; done
REDIS=(--set 'cluster.backend="redis"' --set "redis.url=\"redis://127.0.0.1:$RPORT\"")
start() { # NAME [args...]: starts a broker; its port in $TMP/NAME.port
  local name=$1; shift
  target/release/mqttd --bind 127.0.0.1:0 --workers 2 --log-level warn \
    --set 'metrics.bind="127.0.0.1:0"' --set quic.enabled=false "$@" > "$TMP/$name.out" 2>&1 &
  echo $! > "$TMP/$name.pid"
  until grep -q "listening tcp" "$TMP/$name.out"; do sleep 0.1; done
  awk '/listening tcp/{print $4}' "$TMP/$name.out" | cut -d: -f2 > "$TMP/$name.port"
}
SUB=()
case $MODE in
  embedded) start a ;;
  redis) start a "${REDIS[@]}" ;;
  cross) start a "${REDIS[@]}"; start b "${REDIS[@]}"; SUB=(--subscriber-port "$(cat "$TMP/b.port")") ;;
  persist) start a "${REDIS[@]}"; SUB=(--persistent-subscribers) ;;
  persist-embedded) start a; SUB=(--persistent-subscribers) ;;
  *) echo "unknown mode $MODE"; exit 2 ;;
esac
A=$(cat "$TMP/a.pid"); B=$(cat "$TMP/b.pid" 2>/dev/null || true)
SC=(--pairs 100 --payload 64 --duration 8 --max-lead 1000 --qos "$QOS")
[ -n "${RATE:-}" ] && SC+=(--rate "$RATE")
[ "$QOS" != 0 ] && SC+=(--inflight 64)
target/release/mqttd-bench pairs --port "$(cat "$TMP/a.port")" "${SUB[@]}" "${SC[@]}" --json 2>/dev/null |
  grep '^{' | python3 -c "
import json, sys
d = json.loads(sys.stdin.read())
print('$MODE qos$QOS delivered/s=%.0f lost=%d p99=%.1fms' % (d['received_per_s'], d['lost'], d['latency_p99_us'] / 1000))"
case $MODE in embedded|persist-embedded) exit 0 ;; esac
metrics=http://$(awk '/listening metrics/{print $4}' "$TMP/a.out" | head -1)/metrics
curl -s "$metrics" | grep -E '^mqttd_redis_(round_trips|commands|messages)_total' | python3 -c "
import collections, sys
t = collections.Counter()
for line in sys.stdin:
    name, v = line.rsplit(' ', 1)
    if 'direction=\"in\"' not in name:  # messages written, not read
        t[name.split('{')[0]] += float(v)
trips = t['mqttd_redis_round_trips_total'] or 1
print('  round trips=%d commands=%d messages=%d messages/round trip=%.0f' % (
    t['mqttd_redis_round_trips_total'], t['mqttd_redis_commands_total'],
    t['mqttd_redis_messages_total'], t['mqttd_redis_messages_total'] / trips))"
