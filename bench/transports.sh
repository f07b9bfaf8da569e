#!/usr/bin/env bash
# Throughput per transport: plain TCP, TLS, WebSocket and WebSocket over TLS, for mqttd (2
# workers) and, if installed, Mosquitto (TLS and, when built with it, WebSocket listeners).
# The `pairs` scenario speaks plain TCP only, so TLS/ws/wss go through `mqttd-bench proxy`
# (plain TCP in, the transport out) on the same machine; `tcp-proxy` is a run through the
# proxy copying plain TCP, which separates the proxy's own cost from the transport's. The
# proxy opens its 200 upstream connections (TLS and WebSocket handshakes included) before the
# run starts, all at once: Mosquitto answers each WebSocket upgrade only when its main loop
# next wakes (up to 200 ms), which would make `pairs`' one-by-one connects take 40 s. So the
# figures are steady-state throughput; handshake cost is not in them.
# 100 pub/sub pairs, 64 B, each publisher at most 1000 messages ahead, QoS 0 and QoS 1
# (window 64), one fresh broker per run. Prints msgs/s delivered, p99 latency, loss, and CPU
# seconds per million deliveries of the broker (supervisor + workers) and of the proxy, both
# over the whole run (MQTT connects, warm-up, measure, drain), divided by all its deliveries.
# Notes after a row: for mqttd, publishes the broker never counted as received (from its
# metrics) and messages it dropped; duplicates, drain timeouts, connection errors.
# Takes about 3 minutes. Usage: bench/transports.sh   (DUR=S to change the 8 s window)
set -u
cd "$(dirname "$0")/.."
B=target/release/mqttd-bench
DUR=${DUR:-8}
ulimit -n 20000
TMP=$(mktemp -d)
SP=""
PP=""
trap 'kill $SP $PP 2>/dev/null; rm -rf "$TMP"' EXIT
ticks() {
  local t
  t=$(for p in $1; do awk '{print $14+$15}' "/proc/$p/stat" 2>/dev/null; done | paste -sd+ | bc)
  echo "${t:-0}"
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# Waits until `grep -q PATTERN FILE` succeeds while $SP lives; fails if it died.
wait_line() {
  for _ in $(seq 100); do
    grep -q "$1" "$2" && return 0
    kill -0 "$SP" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

# Starts mqttd with every stream listener on a free port; sets SP, PIDS and ADDR[transport].
# With no tls.cert it writes a self-signed Ed25519 certificate to $TMP/tls-cert.pem, which the
# proxy trusts.
declare -A ADDR
start_mqttd() {
  rm -f "$TMP/broker.out" # or the wait below may read the last run's
  target/release/mqttd --bind 127.0.0.1:0 --workers 2 --log-level warn \
    --set quic.enabled=false --set limits.connection_memory_budget=1048576 \
    --set tls.enabled=true --set 'tls.bind="127.0.0.1:0"' \
    --set ws.enabled=true --set 'ws.bind="127.0.0.1:0"' \
    --set wss.enabled=true --set 'wss.bind="127.0.0.1:0"' \
    --set "tls.cert_dir=\"$TMP\"" --set 'metrics.bind="127.0.0.1:0"' \
    > "$TMP/broker.out" 2> "$TMP/broker.err" & SP=$!
  wait_line 'listening metrics' "$TMP/broker.out" || return 1
  CAFILE=$TMP/tls-cert.pem
  METRICS=http://$(awk '$3 == "metrics" {print $4}' "$TMP/broker.out")/metrics
  for t in tcp tls ws wss; do
    ADDR[$t]=$(awk -v t=$t '$2 == "listening" && $3 == t {print $4}' "$TMP/broker.out")
  done
  PIDS="$SP $(pgrep -P "$SP" | paste -sd' ')"
}

# Mosquitto: plain, TLS and (if MOSQ_WS=1) WebSocket listeners. `user root` keeps it from
# switching to the mosquitto user, which could not read the key in $TMP (mode 0700). An
# Ed25519 certificate like mqttd's, but its own: OpenSSL 3.0 cannot read the PKCS#8 v2 key
# mqttd writes.
MOSQ_WS=1
start_mosquitto() {
  local tcp tls ws
  CAFILE=$TMP/mosq-cert.pem
  METRICS=""
  [ -f "$CAFILE" ] || openssl req -x509 -newkey ed25519 -nodes -days 2 -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -addext basicConstraints=critical,CA:FALSE \
    -keyout "$TMP/mosq-key.pem" -out "$CAFILE" 2> /dev/null || return 1
  tcp=$(free_port); tls=$(free_port); ws=$(free_port)
  {
    # No limit on queued QoS 1 messages per client (1000 by default, then dropped): the
    # proxied runs' extra latency would exceed it, and mqttd runs with a large budget too.
    printf 'user root\nallow_anonymous true\nmax_queued_messages 0\nlog_type error\nlog_type warning\n'
    printf 'listener %s 127.0.0.1\n' "$tcp"
    printf 'listener %s 127.0.0.1\ncertfile %s\nkeyfile %s\n' "$tls" "$CAFILE" "$TMP/mosq-key.pem"
    [ "$MOSQ_WS" = 1 ] && printf 'listener %s 127.0.0.1\nprotocol websockets\n' "$ws"
  } > "$TMP/m.conf"
  mosquitto -c "$TMP/m.conf" > /dev/null 2> "$TMP/broker.err" & SP=$!
  PIDS=$SP
  ADDR[tcp]=127.0.0.1:$tcp; ADDR[tls]=127.0.0.1:$tls; ADDR[ws]=127.0.0.1:$ws
  # Not the TLS port: a probe that sends no ClientHello makes Mosquitto log an error.
  for _ in $(seq 50); do
    port_open "$tcp" && { [ "$MOSQ_WS" = 0 ] || port_open "$ws"; } && return 0
    kill -0 "$SP" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

# One run: BROKER (mqttd|mosquitto), VIA (direct|tcp-proxy|tls|ws|wss), QoS arguments.
run() {
  local broker=$1 via=$2 qos=$3 port t0 t1 p0=0 p1=0 res
  if ! "start_$broker"; then
    echo "$broker: did not start: $(tail -3 "$TMP/broker.err" | tr '\n' ' ')"
    kill "$SP" 2>/dev/null; wait "$SP" 2>/dev/null; SP=""
    return
  fi
  if [ "$via" = direct ]; then
    port=${ADDR[tcp]##*:}
  else
    local t=${via%-proxy}
    rm -f "$TMP/proxy.out"
    $B proxy --to "${ADDR[$t]}" --transport "$t" --cafile "$CAFILE" --preconnect 200 \
      > "$TMP/proxy.out" 2> "$TMP/proxy.err" & PP=$!
    until grep -qs listening "$TMP/proxy.out" || ! kill -0 "$PP" 2>/dev/null; do sleep 0.05; done
    port=$(awk '{print $3}' "$TMP/proxy.out" | cut -d: -f2)
    p0=$(ticks "$PP")
  fi
  t0=$(ticks "$PIDS")
  # shellcheck disable=SC2086
  res=$($B pairs --port "$port" --pairs 100 --payload 64 --duration "$DUR" --max-lead 1000 $qos \
    --json 2> "$TMP/bench.err" | grep '^{')
  t1=$(ticks "$PIDS")
  [ -n "$PP" ] && p1=$(ticks "$PP")
  local counters="{}"
  if [ -n "$METRICS" ]; then
    sleep 1.2 # workers report their counters every second
    counters=$(curl -s "$METRICS" | python3 "$TMP/counters.py")
  fi
  echo "$res" | NAME=$broker VIA=$via T=$((t1 - t0)) P=$((p1 - p0)) C=$counters python3 "$TMP/row.py" 2>/dev/null ||
    echo "$broker $via $qos: no result: $(tail -2 "$TMP/bench.err" | tr '\n' ' ')"
  kill -0 "$SP" 2>/dev/null || echo "  $broker DIED during the run: $(tail -3 "$TMP/broker.err" | tr '\n' ' ')"
  # Anything the broker or proxy logged beyond the expected self-signed notice.
  grep -v -e 'self-signed certificate' -e 'should not be run as root' "$TMP/broker.err" | head -3 | sed "s/^/  $broker: /"
  if [ -n "$PP" ]; then
    if grep -q close_notify "$TMP/proxy.err" && [[ $CLOSE_NOTIFY != *" $broker/$via"* ]]; then
      CLOSE_NOTIFY="$CLOSE_NOTIFY $broker/$via"
    fi
    grep -v close_notify "$TMP/proxy.err" | head -3 | sed 's/^/  /'
  fi
  kill $PP "$SP" 2>/dev/null; wait $PP "$SP" 2>/dev/null
  SP=""; PP=""
}

[ -x target/release/mqttd ] && [ -x "$B" ] || { echo "build first: cargo build --release"; exit 1; }
# One table row from the pairs JSON on stdin; CPU ticks in $T (broker) and $P (proxy).
cat > "$TMP/row.py" << 'EOF'
import json, os, sys
d = json.loads(sys.stdin.read())
hz, n = os.sysconf("SC_CLK_TCK"), max(d["delivered"], 1)
broker = int(os.environ["T"]) / hz / n * 1e6
proxy = f'{int(os.environ["P"]) / hz / n * 1e6:10.2f}' if os.environ["VIA"] != "direct" else f'{"-":>10s}'
notes = []
if d["duplicates"]:
    notes.append(f'dup {d["duplicates"]}')
if not d["drain_complete"]:
    notes.append("drain timed out")
if d["connection_errors"]:
    notes.append(f'connection errors {d["connection_errors"]}')
c = json.loads(os.environ["C"])
if "received" in c and c["received"] < d["total_published"]:
    notes.append(f'broker counted {d["total_published"] - c["received"]} fewer publishes received than sent')
if c.get("dropped"):
    notes.append(f'broker dropped {c["dropped"]} ({c["reasons"]})')
print(f'{os.environ["NAME"]:9s} {os.environ["VIA"]:9s} {d["qos"]:3d} {d["received_per_s"]:10,.0f} '
      f'{d["latency_p99_us"] / 1000:8.1f} {d["lost"]:6d} {broker:10.2f} {proxy}'
      + ("  " + ", ".join(notes) if notes else ""))
EOF
# mqttd's counters summed over workers, as JSON: received publishes, dropped messages.
cat > "$TMP/counters.py" << 'EOF'
import collections, json, sys
received, dropped = 0, collections.Counter()
for line in sys.stdin:
    if line.startswith("mqttd_messages_received_total"):
        received += int(float(line.rsplit(" ", 1)[1]))
    elif line.startswith("mqttd_messages_dropped_total"):
        reason = line.split('reason="', 1)[1].split('"', 1)[0]
        dropped[reason] += int(float(line.rsplit(" ", 1)[1]))
reasons = ", ".join(f"{r} {n}" for r, n in dropped.items() if n)
print(json.dumps({"received": received, "dropped": sum(dropped.values()), "reasons": reasons}))
EOF
CLOSE_NOTIFY=""
printf '%-9s %-9s %3s %10s %8s %6s %10s %10s\n' broker via qos msgs/s "p99 ms" lost "broker s/M" "proxy s/M"
QOS=("--qos 0" "--qos 1 --inflight 64")
for via in direct tcp-proxy tls ws wss; do
  for q in "${QOS[@]}"; do run mqttd "$via" "$q"; done
done
if command -v mosquitto > /dev/null; then
  # Debian's and most builds have WebSocket support; a build without it refuses the config.
  if ! start_mosquitto && grep -qi websocket "$TMP/broker.err"; then MOSQ_WS=0; fi
  kill "$SP" 2>/dev/null; wait "$SP" 2>/dev/null; SP=""
  VIAS="direct tls"
  if [ "$MOSQ_WS" = 1 ]; then VIAS="$VIAS ws"; else echo "mosquitto: no websockets support, ws skipped"; fi
  for via in $VIAS; do
    for q in "${QOS[@]}"; do run mosquitto "$via" "$q"; done
  done
fi
[ -n "$CLOSE_NOTIFY" ] && echo "note: TLS connections closed by the broker without close_notify in:$CLOSE_NOTIFY"
exit 0
