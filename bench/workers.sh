#!/usr/bin/env bash
# One run, several brokers: mqttd with 1, 2 (or more) workers and the peers that are
# installed (Mosquitto and NATS from apt, rumqttd from `cargo install rumqttd` with
# RUMQTTD=/path/to/rumqttd). 100 pub/sub pairs, 64 B, QoS 0 and QoS 1 (window 64), each
# publisher at most 1000 messages ahead of its subscriber. Prints msgs/s, p99 latency, broker
# CPU per delivered message (all broker processes), loss, and for mqttd the share of
# messages that crossed workers. Usage: bench/workers.sh [targets...]
#   targets: mqttd:N mosquitto nats rumqttd   (default: mqttd:1 mqttd:2 mosquitto nats rumqttd)
set -u
cd "$(dirname "$0")/.."
B=target/release/mqttd-bench
DUR=${DUR:-10}
ulimit -n 20000
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
ticks() { for p in $1; do awk '{print $14+$15}' "/proc/$p/stat" 2>/dev/null; done | paste -sd+ | bc; }
wait_port() { until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do sleep 0.1; done; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start() { # sets PORT, SP (pid to kill), PIDS (processes whose CPU counts)
  case $1 in
    mqttd:*)
      # Publishers up to 1000 messages ahead need more than the 20 KB per-connection model;
      # the peers have no per-connection byte budget, so neither does mqttd here.
      target/release/mqttd --bind 127.0.0.1:0 --workers "${1#mqttd:}" --log-level warn --set metrics.bind=\"127.0.0.1:0\" ${MQTTD_ARGS:---set limits.connection_memory_budget=1048576} > "$TMP/out" 2>/dev/null & SP=$!
      until grep -q listening "$TMP/out"; do sleep 0.1; done
      PORT=$(awk '{print $4}' "$TMP/out" | cut -d: -f2); PIDS="$SP $(pgrep -P $SP | paste -sd' ')";;
    mosquitto)
      PORT=$(free_port); printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_connections -1\n' "$PORT" > "$TMP/m.conf"
      mosquitto -c "$TMP/m.conf" > /dev/null 2>&1 & SP=$!; PIDS=$SP; wait_port "$PORT";;
    nats)
      PORT=$(free_port); NP=$(free_port)
      printf 'server_name: bench\nlisten: 127.0.0.1:%s\njetstream { store_dir: "%s/js" }\nmqtt { listen: 127.0.0.1:%s }\n' "$NP" "$TMP" "$PORT" > "$TMP/n.conf"
      nats-server -c "$TMP/n.conf" > /dev/null 2>&1 & SP=$!; PIDS=$SP; wait_port "$PORT";;
    rumqttd)
      PORT=$(free_port)
      sed -e "s/0.0.0.0:1883/127.0.0.1:$PORT/" -e 's/0.0.0.0:1884/127.0.0.1:0/' -e 's/0.0.0.0:8083/127.0.0.1:0/' \
          -e 's/0.0.0.0:3030/127.0.0.1:0/' -e 's/127.0.0.1:9042/127.0.0.1:0/' -e 's/max_payload_size = 20480/max_payload_size = 1048576/' \
          "${RUMQTTD_CONFIG:-$HOME/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/rumqttd-0.20.0/rumqttd.toml}" > "$TMP/r.toml"
      "${RUMQTTD:-rumqttd}" -c "$TMP/r.toml" -q > /dev/null 2>&1 & SP=$!; PIDS=$SP; wait_port "$PORT";;
  esac
}

for T in "${@:-mqttd:1 mqttd:2 mosquitto nats rumqttd}"; do
  case $T in
    mosquitto) command -v mosquitto > /dev/null || continue;;
    nats) command -v nats-server > /dev/null || continue;;
    rumqttd) command -v "${RUMQTTD:-rumqttd}" > /dev/null || continue;;
  esac
  for sc in "--qos 0 --max-lead 1000" "--qos 1 --inflight 64 --max-lead 1000"; do
    start "$T"
    T0=$(ticks "$PIDS")
    # shellcheck disable=SC2086
    RES=$($B pubsub --port "$PORT" --pairs 100 --payload 64 --duration "$DUR" $sc 2>&1 | grep '^{')
    T1=$(ticks "$PIDS")
    SHARE=""
    if [[ $T == mqttd:* ]]; then
      sleep 1.2 # $SYS refreshes every second
      FWD=$(timeout 3 mosquitto_sub -p "$PORT" -t '$SYS/broker/messages/forwarded' -C 1)
      RCV=$(timeout 3 mosquitto_sub -p "$PORT" -t '$SYS/broker/messages/received' -C 1)
      SHARE=$(python3 -c "print(f'crossed {${FWD:-0}/max(${RCV:-1},1):.0%}')")
    fi
    echo "$RES" | T_NAME=$T SC="$sc" T=$((T1 - T0)) SHARE="$SHARE" python3 -c '
import json, os, sys
d = json.loads(sys.stdin.read())
cpu_us = int(os.environ["T"]) / os.sysconf("SC_CLK_TCK") * 1e6 / max(d["received"], 1)
t, sc, share = os.environ["T_NAME"], os.environ["SC"], os.environ["SHARE"]
rate, p99, lost = d["received_per_s"], d["latency_p99_us"] / 1000, d["lost"]
print(f"{t:10s} {sc:38s} {rate:>12,.0f} msgs/s  p99 {p99:8.1f} ms  cpu {cpu_us:5.2f} us/msg  lost {lost}  {share}")' 2>/dev/null || echo "$T $sc: no result"
    kill "$SP" 2>/dev/null; wait "$SP" 2>/dev/null
  done
done
