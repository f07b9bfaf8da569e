#!/usr/bin/env bash
# Memory per idle connection over TCP, TLS, WebSocket and WebSocket over TLS, mqttd and
# Mosquitto in one run: a fresh broker per transport, N idle MQTT 3.1.1 connections
# (bench/idle-layered.py), RSS delta per connection.
# Usage: bench/idle-layered.sh   (N=5000 connections)
set -u
cd "$(dirname "$0")/.."
N=${N:-5000}
ulimit -n 20000
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do sleep 0.1; done; }
# One certificate for both brokers (mqttd generates it; Mosquitto reads the same files).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
  -keyout "$TMP/key.pem" -out "$TMP/cert.pem" 2>/dev/null
for M in tcp tls ws wss; do
  target/release/mqttd --bind 127.0.0.1:0 --workers 1 --log-level warn --set quic.enabled=false \
    --set "tls.cert=\"$TMP/cert.pem\"" --set "tls.key=\"$TMP/key.pem\"" \
    --set tls.enabled=true --set 'tls.bind="127.0.0.1:0"' --set ws.enabled=true \
    --set 'ws.bind="127.0.0.1:0"' --set wss.enabled=true --set 'wss.bind="127.0.0.1:0"' \
    --set 'metrics.bind="127.0.0.1:0"' > "$TMP/out" 2>/dev/null & SP=$!
  until grep -q "listening metrics" "$TMP/out"; do sleep 0.1; done
  PORT=$(awk "/listening $M /{print \$4}" "$TMP/out" | cut -d: -f2)
  printf 'mqttd      '
  python3 bench/idle-layered.py --port "$PORT" --mode "$M" --count "$N" --pids "$(pgrep -P $SP)" --cafile "$TMP/cert.pem"
  kill $SP; wait $SP 2>/dev/null
  command -v mosquitto > /dev/null || continue
  # Mosquitto: TCP and TLS only here (its websockets listener is measured for throughput in
  # bench/transports.sh).
  case $M in ws|wss) continue;; esac
  PORT=$(free_port)
  {
    # Run as root (by default it switches to user mosquitto, who cannot read $TMP).
    echo "user root"; echo "per_listener_settings false"; echo "allow_anonymous true"
    echo "max_connections -1"
    echo "listener $PORT 127.0.0.1"
    case $M in tls|wss) echo "certfile $TMP/cert.pem"; echo "keyfile $TMP/key.pem";; esac
  } > "$TMP/m.conf"
  mosquitto -c "$TMP/m.conf" > "$TMP/m.log" 2>&1 & SP=$!
  wait_port "$PORT"
  printf 'mosquitto  '
  python3 bench/idle-layered.py --port "$PORT" --mode "$M" --count "$N" --pids "$SP" --cafile "$TMP/cert.pem"
  kill $SP; wait $SP 2>/dev/null
done
