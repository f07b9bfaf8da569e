"""MQTT.js (Node) over WebSocket, WebSocket over TLS and TLS.

js/echo.mjs subscribes with MQTT.js and republishes every message it gets; a paho client
over TCP publishes numbered QoS 1 messages to it and counts the echoes (lost = 0). The
MQTT.js version is pinned by js/package-lock.json and installed with `npm ci` into
js/node_modules (not in git) when missing. Skipped only when node or npm is absent.
"""

import shutil
import subprocess
import threading

import pytest

from conftest import REPO_ROOT, USE_MOSQUITTO, layered, mqtt, recv_seqs

pytestmark = pytest.mark.skipif(USE_MOSQUITTO, reason="mqttd's TLS/WebSocket listeners")

JS_DIR = REPO_ROOT / "tests" / "interop" / "js"
N = 50
_install_lock = threading.Lock()


@pytest.fixture(scope="session")
def echo_script():
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"MQTT.js tests need {' and '.join(missing)} (not installed)")
    with _install_lock:
        if not (JS_DIR / "node_modules" / "mqtt" / "package.json").exists():
            r = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=JS_DIR,
                               capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, f"npm ci failed:\n{r.stdout}\n{r.stderr}"
    return str(JS_DIR / "echo.mjs")


@pytest.mark.parametrize("transport", ["ws", "wss", "tls"])
@pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
def test_mqttjs_echoes_qos1_counted(broker_factory, pki, connected, procs, echo_script,
                                    transport, version):
    broker = broker_factory(**layered(pki))
    url = {"ws": f"ws://127.0.0.1:{broker.ws_port}/mqtt",
           "wss": f"wss://127.0.0.1:{broker.wss_port}/mqtt",
           "tls": f"mqtts://127.0.0.1:{broker.tls_port}"}[transport]
    ca = "-" if transport == "ws" else pki.ca_a.cert_path
    sink = connected(broker, mqtt.MQTTv311)
    sink.subscribe("mqttjs/out", 1)
    echo = procs("node", echo_script, url, ca, str(version), str(N))
    echo.wait_line(lambda line: line == "READY" or line.startswith("ERROR"))
    assert "READY" in echo.all, echo.all
    for i in range(N):
        sink.publish("mqttjs/in", str(i).encode(), qos=1, wait=False)
    recv_seqs(sink, "mqttjs/out", N)  # lost = 0, or it fails
    assert echo.wait() == 0, echo.all
    assert echo.all[-1] == f"DONE {N}", echo.all
