#!/usr/bin/env bash
# The whole test suite: Rust unit, property and integration tests (rumqttc against the real
# mqttd binary, raw malformed-input tests), then the interop suite with clients we did not
# write (paho-mqtt, mosquitto_pub/sub). Installs those clients first if they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v mosquitto_pub >/dev/null || need_apt+=(mosquitto-clients)
command -v mosquitto >/dev/null || need_apt+=(mosquitto)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
python3 -c 'import paho.mqtt, pytest' 2>/dev/null || python3 -m pip install -q -r tests/requirements.txt

cargo build --workspace --bins
cargo test --workspace
python3 -m pytest tests/interop -q
