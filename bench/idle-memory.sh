#!/usr/bin/env bash
# Memory per idle connection, mqttd and its peers in one run: each broker fresh, 15,000 idle
# MQTT 3.1.1 connections (mqttd-bench idle), RSS delta per connection from /proc; for mqttd
# also what its accountant says (mqttd_accounted_bytes delta and the per-connection
# histogram from /metrics), next to the 20 KB model.
# Usage: bench/idle-memory.sh [targets...]   (default: mqttd mosquitto nats rumqttd)
#   N=15000 connections; RUMQTTD=/path/to/rumqttd
set -u
SP=$$
cd "$(dirname "$0")/.."
B=target/release/mqttd-bench
N=${N:-15000}
ulimit -n 20000
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
wait_port() { until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null || ! kill -0 "$SP" 2>/dev/null; do sleep 0.1; done; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
metric() { # sum of a metric's samples (optionally filtered by a label regex) on $MPORT
  curl -s "http://127.0.0.1:$MPORT/metrics" | awk -v n="$1" -v f="${2:-}" \
    '$1 ~ "^"n"({|$)" && $0 ~ f {s += $NF} END {printf "%.0f\n", s}'
}

for T in "${@:-mqttd mosquitto nats rumqttd}"; do
  PORT=$(free_port)
  case $T in
    mqttd)
      target/release/mqttd --bind "127.0.0.1:$PORT" --workers 1 --log-level warn \
        --set metrics.bind=\"127.0.0.1:0\" > "$TMP/out" 2>/dev/null & SP=$!
      until grep -q "listening metrics" "$TMP/out" || ! kill -0 "$SP" 2>/dev/null; do sleep 0.1; done
      MPORT=$(awk '/listening metrics/ {print $4}' "$TMP/out" | cut -d: -f2)
      WP=$(pgrep -P "$SP" | head -1);;
    mosquitto)
      command -v mosquitto > /dev/null || continue
      printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_connections -1\n' "$PORT" > "$TMP/m.conf"
      mosquitto -c "$TMP/m.conf" > /dev/null 2>&1 & SP=$!; WP=$SP;;
    nats)
      command -v nats-server > /dev/null || continue
      printf 'server_name: bench\nlisten: 127.0.0.1:%s\njetstream { store_dir: "%s/js" }\nmqtt { listen: 127.0.0.1:%s }\n' "$(free_port)" "$TMP" "$PORT" > "$TMP/n.conf"
      nats-server -c "$TMP/n.conf" > /dev/null 2>&1 & SP=$!; WP=$SP;;
    rumqttd)
      command -v "${RUMQTTD:-rumqttd}" > /dev/null || continue
      sed -e "s/0.0.0.0:1883/127.0.0.1:$PORT/" -e 's/0.0.0.0:1884/127.0.0.1:0/' -e 's/0.0.0.0:8083/127.0.0.1:0/' \
          -e 's/0.0.0.0:3030/127.0.0.1:0/' -e 's/127.0.0.1:9042/127.0.0.1:0/' -e 's/max_connections = 10010/max_connections = 20000/' \
          "${RUMQTTD_CONFIG:-$HOME/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/rumqttd-0.20.0/rumqttd.toml}" > "$TMP/r.toml"
      "${RUMQTTD:-rumqttd}" -c "$TMP/r.toml" -q > /dev/null 2>&1 & SP=$!; WP=$SP;;
  esac
  wait_port "$PORT"
  [[ $T == mqttd ]] && A0=$(metric mqttd_accounted_bytes)
  # The worker (mqttd) or the broker process holds the connections; --hold keeps them open
  # while the accountant is read.
  $B idle --port "$PORT" --connections "$N" --broker-pid "$WP" --hold 6 > "$TMP/idle.json" 2>"$TMP/idle.err" &
  BENCH=$!
  EXTRA=""
  if [[ $T == mqttd ]]; then
    until [[ $(metric mqttd_connections) -ge $N ]] || ! kill -0 $BENCH 2>/dev/null; do sleep 0.5; done
    A1=$(metric mqttd_accounted_bytes)
    MAXB=$(curl -s "http://127.0.0.1:$MPORT/metrics" | awk '/^mqttd_connection_accounted_bytes_bucket/ && $NF > 0 {print; exit}')
    EXTRA="accounted $(( (A1 - A0) / N )) B/conn (smallest non-empty bucket: ${MAXB:-none})"
  fi
  wait $BENCH
  python3 - "$T" "$EXTRA" "$TMP/idle.json" <<'PY'
import json, sys
t, extra, path = sys.argv[1], sys.argv[2], sys.argv[3]
try:
    d = json.loads([l for l in open(path) if l.startswith("{")][-1])
except Exception as e:
    print(f"{t:10s} no result ({e})"); sys.exit()
per = d["bytes_per_connection"]
print(f"{t:10s} connected {d.get('connected')}  RSS {per:,.0f} B/conn  {extra}  (model 20,480 B)")
PY
  kill "$SP" 2>/dev/null; wait "$SP" 2>/dev/null
done
