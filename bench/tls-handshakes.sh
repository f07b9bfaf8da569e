#!/usr/bin/env bash
# Full TLS handshakes (no resumption) per second and per broker CPU-second, mqttd (1
# worker) and Mosquitto in one run: `openssl s_time -new` clients (CLIENTS of them, for
# SECS seconds) against each broker's TLS listener, with the same ECDSA P-256 certificate.
# Usage: bench/tls-handshakes.sh   (CLIENTS=2 SECS=8)
set -u
cd "$(dirname "$0")/.."
CLIENTS=${CLIENTS:-2}
SECS=${SECS:-8}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do sleep 0.1; done; }
ticks() { for p in $1; do awk '{print $14+$15}' "/proc/$p/stat" 2>/dev/null; done | paste -sd+ | bc; }
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
  -keyout "$TMP/key.pem" -out "$TMP/cert.pem" 2>/dev/null
HZ=$(getconf CLK_TCK)
run() { # NAME PORT PIDS
  local before after n=0
  local clients=()
  before=$(ticks "$3")
  for i in $(seq "$CLIENTS"); do
    openssl s_time -connect "127.0.0.1:$2" -new -time "$SECS" -CAfile "$TMP/cert.pem" > "$TMP/s$i" 2>&1 &
    clients+=($!)
  done
  wait "${clients[@]}"
  after=$(ticks "$3")
  for i in $(seq "$CLIENTS"); do
    n=$((n + $(awk '/connections in [0-9.]+ real/ {print $1; exit}' "$TMP/s$i")))
  done
  python3 -c "
n, cpu = $n, ($after - $before) / $HZ
print('%-10s %6d handshakes in %ds: %5.0f/s, broker CPU %.2f s, %5.0f handshakes per broker CPU-second' % ('$1', n, $SECS, n / $SECS, cpu, n / cpu if cpu else 0))"
}
target/release/mqttd --bind 127.0.0.1:0 --workers 1 --log-level warn --set quic.enabled=false \
  --set "tls.cert=\"$TMP/cert.pem\"" --set "tls.key=\"$TMP/key.pem\"" --set tls.enabled=true \
  --set 'tls.bind="127.0.0.1:0"' --set 'metrics.bind="127.0.0.1:0"' > "$TMP/out" 2>/dev/null & SP=$!
until grep -q "listening metrics" "$TMP/out"; do sleep 0.1; done
run mqttd "$(awk '/listening tls /{print $4}' "$TMP/out" | cut -d: -f2)" "$(pgrep -P $SP)"
kill $SP; wait $SP 2>/dev/null
if command -v mosquitto > /dev/null; then
  PORT=$(free_port)
  printf 'user root\nallow_anonymous true\nlistener %s 127.0.0.1\ncertfile %s\nkeyfile %s\n' \
    "$PORT" "$TMP/cert.pem" "$TMP/key.pem" > "$TMP/m.conf"
  mosquitto -c "$TMP/m.conf" > /dev/null 2>&1 & SP=$!
  wait_port "$PORT"
  run mosquitto "$PORT" "$SP"
  kill $SP; wait $SP 2>/dev/null
fi
