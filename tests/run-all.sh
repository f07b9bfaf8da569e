#!/usr/bin/env bash
# The whole test suite: Rust unit, property and integration tests (rumqttc against the real
# mqttd binary, raw malformed-input tests, supervisor and cluster tests), then the interop
# suite with clients we did not write (paho-mqtt, mosquitto_pub/sub, MQTT.js, an aioquic
# MQTT-over-QUIC client); then the client suites again against 4 worker processes.
# Installs the clients (and promtool) first if they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v mosquitto_pub >/dev/null || need_apt+=(mosquitto-clients)
command -v mosquitto >/dev/null || need_apt+=(mosquitto)
# The Redis backend's tests start their own redis-server (Debian's) on free ports.
command -v redis-server >/dev/null || need_apt+=(redis-server)
# promtool checks configs/*.yml; no recommends: they pull node_exporter, which wants :9100.
command -v promtool >/dev/null || need_apt+=(prometheus)
# MQTT.js runs under Node (tests/interop/test_mqttjs.py); Debian's npm brings nodejs.
command -v npm >/dev/null || need_apt+=(npm)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
python3 -c 'import paho.mqtt, pytest, aioquic, cryptography' 2>/dev/null ||
  python3 -m pip install -q -r tests/requirements.txt
# MQTT.js for tests/interop/test_mqttjs.py, at the version of its lockfile (node_modules is
# not in git).
if [ ! -f tests/interop/js/node_modules/mqtt/package.json ]; then
  (cd tests/interop/js && npm ci --no-audit --no-fund --loglevel=error)
fi

# One build, with the tests' feature set: `cargo test` also builds the binaries (the bench
# tests and the interop suite use target/debug/mqttd), and a separate `cargo build` would
# compile much of the graph a second time with other features (disk is short on CI).
# The metrics tests check configs/ with promtool: fail rather than skip if it is missing.
MQTTD_REQUIRE_PROMTOOL=1 cargo test --workspace
export MQTTD_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/mqttd"
python3 -m pytest tests/interop -q
# The foundation's suites and the QUIC suite again, unchanged, against a broker of 4 worker
# processes.
# The test binaries built above, run directly: `cargo test -p ... --test ...` would resolve
# other features and build the broker a third time.
mapfile -t suites < <(cargo test --workspace --no-run --message-format=json 2>/dev/null |
  python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if (m.get("reason") == "compiler-artifact" and m["target"]["kind"] == ["test"]
            and m["target"]["name"] in ("v311", "v5", "ordering", "malformed", "quic")):
        print(m["executable"])')
[ ${#suites[@]} -eq 5 ] || { echo "run-all: expected 5 test binaries, found ${#suites[@]}"; exit 1; }
for suite in "${suites[@]}"; do
  (cd supervisor && MQTTD_TEST_WORKERS=4 "$suite")
done
MQTTD_TEST_WORKERS=4 python3 -m pytest tests/interop -q
# The foundation's rumqttc and paho-mqtt suites again, unchanged, against a broker in Redis
# mode (2 workers) on a throwaway redis-server.
redis_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis_dir=$(mktemp -d)
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --dir "$redis_dir" >/dev/null &
redis_pid=$!
trap 'kill $redis_pid 2>/dev/null; rm -rf "$redis_dir"' EXIT
until redis-cli -p "$redis_port" ping >/dev/null 2>&1; do sleep 0.1; done
export MQTTD_TEST_REDIS_URL="redis://127.0.0.1:$redis_port"
for suite in "${suites[@]}"; do
  case "$suite" in */v311-*|*/v5-*) (cd supervisor && MQTTD_TEST_WORKERS=2 "$suite") ;; esac
done
MQTTD_TEST_WORKERS=2 python3 -m pytest tests/interop -q
# And against two Redis-mode hosts (2 workers each) on one key prefix, the clients of each
# test alternating between them.
export MQTTD_TEST_REDIS_HOSTS=2
for suite in "${suites[@]}"; do
  case "$suite" in */v311-*|*/v5-*) (cd supervisor && MQTTD_TEST_WORKERS=2 "$suite") ;; esac
done
MQTTD_TEST_WORKERS=2 python3 -m pytest tests/interop -q
