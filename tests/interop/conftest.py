"""Fixtures and helpers for the mqttd interop suite.

Broker selection:
  * default: build `mqttd` once per session (`cargo build --bin mqttd`, cwd =
    repo root, honouring CARGO_TARGET_DIR; MQTTD_BIN overrides the binary)
    and start `mqttd --bind 127.0.0.1:0 --workers N [--set key=value ...]` per
    test (N = MQTTD_TEST_WORKERS, default 1).
  * MQTTD_TEST_BROKER=mosquitto: start a system `mosquitto` per test instead.

TLS and WebSocket: `broker_factory(**layered(pki))` turns on the tls, ws and wss listeners
(ports in `broker.tls_port`, `.ws_port`, `.wss_port`) with the certificates of the `pki`
fixture (certs.py, made at run time); `Client(..., transport="tls"|"ws"|"wss",
tls=tls_context(...))` connects through them.
"""

import json
import os
import queue
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 10.0  # generous deadline for any single expected event
USE_MOSQUITTO = os.environ.get("MQTTD_TEST_BROKER", "") == "mosquitto"
LISTEN_RE = re.compile(r"mqttd listening tcp ([0-9.]+):(\d+)")
# The lines after the TCP one: quic, tls, ws, wss (those enabled), then metrics, always last.
OTHER_LISTEN_RE = re.compile(r"mqttd listening (quic|tls|ws|wss|metrics) ([0-9.]+):(\d+)")
ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")

# mqttd `--set` keys -> mosquitto.conf option (value passed through as-is).
MOSQUITTO_SETTINGS = {
    "limits.max_queued_messages": "max_queued_messages",
}

VERSIONS = [
    pytest.param(mqtt.MQTTv311, id="v311"),
    pytest.param(mqtt.MQTTv5, id="v5"),
]


# --------------------------------------------------------------------------
# broker processes
# --------------------------------------------------------------------------
class Broker:
    def __init__(self, proc, host, port, kind, log_path, ports=None):
        self.proc = proc
        self.host = host
        self._port = port
        # With MQTTD_TEST_REDIS_HOSTS=2 a second host on the same Redis prefix: `port`
        # alternates between the two, so the clients of one test spread over both hosts.
        # The other ports below are this (the first) host's.
        self.second = None
        self._turn = 0
        ports = ports or {}
        self.quic_port = ports.get("quic")  # MQTT over QUIC (UDP), mqttd only
        self.tls_port = ports.get("tls")  # the listeners a test turned on, else None
        self.ws_port = ports.get("ws")
        self.wss_port = ports.get("wss")
        self.metrics_port = ports.get("metrics")
        self.kind = kind
        self.log_path = log_path

    @property
    def tcp_port(self):
        """This host's MQTT/TCP port (`port` alternates between hosts when there are two)."""
        return self._port

    @property
    def port(self):
        if self.second is None:
            return self._port
        self._turn += 1
        return self._port if self._turn % 2 else self.second.port

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def log_tail(self, n=40):
        out = []
        for path in (Path(self.log_path), Path(self.log_path).with_suffix(".stdout")):
            if path.exists():
                out += path.read_text(errors="replace").splitlines()[-n:]
        return "\n".join(out) or "<no log>"

    def log_text(self):
        """The broker's stderr log so far, without colour codes."""
        return ANSI_RE.sub("", Path(self.log_path).read_text(errors="replace"))

    def metrics(self):
        """/metrics of this host as [(name, {label: value}, float)]."""
        url = f"http://{self.host}:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=TIMEOUT) as r:
            text = r.read().decode()
        out = []
        for line in text.splitlines():
            m = METRIC_RE.match(line)
            if m:
                labels = dict(LABEL_RE.findall(m.group(2) or ""))
                out.append((m.group(1), labels, float(m.group(3))))
        return out

    def metric(self, name, **labels):
        """The sum of `name` over the samples whose labels include `labels` (all workers)."""
        return sum(v for n, ls, v in self.metrics()
                   if n == name and all(ls.get(k) == want for k, want in labels.items()))

    def stop(self):
        """Terminate by PID, kill after a deadline. Returns True if it (and the second
        host, if any) was alive."""
        second_alive = self.second.stop() if self.second is not None else True
        was_alive = self.alive()
        if was_alive:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        return was_alive and second_alive


METRIC_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
LABEL_RE = re.compile(r'(\w+)="([^"]*)"')


def wait_until(pred, what, timeout=TIMEOUT):
    """Polls `pred` until it returns a true value (returned) or the deadline passes."""
    end = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(host, port, proc, deadline=TIMEOUT):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


_build = {}
_build_lock = threading.Lock()


def mqttd_binary():
    """Build once per session; cache success or failure."""
    if os.environ.get("MQTTD_BIN"):
        return os.environ["MQTTD_BIN"]
    with _build_lock:
        if "result" not in _build:
            target = Path(os.environ.get("CARGO_TARGET_DIR", REPO_ROOT / "target"))
            if not target.is_absolute():
                target = REPO_ROOT / target
            r = subprocess.run(["cargo", "build", "--bin", "mqttd"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=1800)
            if r.returncode != 0:
                _build["result"] = ("fail", r.stderr[-4000:])
            else:
                _build["result"] = ("ok", str(target / "debug" / "mqttd"))
        status, val = _build["result"]
    if status != "ok":
        pytest.fail("cargo build --bin mqttd failed:\n" + val, pytrace=False)
    return val


def start_mosquitto(tmp_path, settings):
    port = free_port()
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence false",
             "max_queued_messages 1000"]
    for key, value in settings.items():
        if key not in MOSQUITTO_SETTINGS:
            pytest.skip(f"setting {key} has no mosquitto equivalent")
        lines.append(f"{MOSQUITTO_SETTINGS[key]} {value}")
    conf = tmp_path / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    log_path = tmp_path / "broker.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    broker = Broker(proc, "127.0.0.1", port, "mosquitto", log_path)
    if not wait_port("127.0.0.1", port, proc):
        broker.stop()
        pytest.fail("mosquitto did not start listening:\n" + broker.log_tail())
    return broker


def start_mqttd(tmp_path, settings, workers=None):
    prefix = f"test-{uuid.uuid4().hex}"
    broker = start_mqttd_host(tmp_path, settings, prefix, workers)
    if os.environ.get("MQTTD_TEST_REDIS_URL") and os.environ.get("MQTTD_TEST_REDIS_HOSTS") == "2":
        second_dir = tmp_path / "host2"
        second_dir.mkdir()
        broker.second = start_mqttd_host(second_dir, settings, prefix, workers)
    return broker


def start_mqttd_host(tmp_path, settings, prefix, workers=None):
    binary = mqttd_binary()
    if workers is None:
        # Until cross-worker routing lands, clients of one test must share a worker.
        workers = os.environ.get("MQTTD_TEST_WORKERS", "1")
    args = [binary, "--bind", "127.0.0.1:0", "--set", 'quic.bind="127.0.0.1:0"',
            "--workers", str(workers),
            "--set", 'metrics.bind="127.0.0.1:0"']
    # The suite runs again against a broker in Redis mode (tests/run-all.sh).
    if os.environ.get("MQTTD_TEST_REDIS_URL"):
        # Each test's brokers on their own key prefix: brokers of different tests are not one
        # cluster.
        args += ["--set", 'cluster.backend="redis"',
                 "--set", f'redis.url="{os.environ["MQTTD_TEST_REDIS_URL"]}"',
                 "--set", f'redis.prefix="{prefix}"']
    for key, value in settings.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        args += ["--set", f"{key}={value}"]
    log_path = tmp_path / "broker.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=log)
    log.close()
    lines = queue.Queue()

    def pump():  # keep draining stdout so the broker never blocks on it
        with open(log_path.with_suffix(".stdout"), "wb") as out:
            for raw in proc.stdout:
                out.write(raw)
                out.flush()
                lines.put(raw.decode(errors="replace"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    end = time.monotonic() + TIMEOUT
    while True:
        try:
            line = lines.get(timeout=max(0.01, end - time.monotonic()))
        except queue.Empty:
            line = None
        m = LISTEN_RE.search(line) if line else None
        if m:
            # The other listeners follow the TCP one at once, the metrics line last (this
            # harness always sets metrics.bind).
            ports = read_other_ports(lines, end)
            if "metrics" in ports:
                return Broker(proc, m.group(1), int(m.group(2)), "mqttd", log_path, ports)
            line = None
        if line is None or time.monotonic() > end:
            Broker(proc, "", 0, "mqttd", log_path).stop()
            pytest.fail(f"mqttd did not print 'mqttd listening tcp ...' (rc={proc.poll()}):\n"
                        + Path(log_path).read_text(errors="replace")[-3000:], pytrace=False)


def read_other_ports(lines, end):
    """After the TCP line: {"quic"|"tls"|"ws"|"wss"|"metrics": port} up to the metrics line."""
    ports = {}
    while "metrics" not in ports:
        try:
            line = lines.get(timeout=max(0.01, end - time.monotonic()))
        except queue.Empty:
            line = None
        if line is None:
            return ports
        m = OTHER_LISTEN_RE.search(line)
        if m:
            ports[m.group(1)] = int(m.group(3))
    return ports


@pytest.fixture
def broker_factory(tmp_path):
    """broker_factory(workers=None, **settings) -> Broker. Settings are mqttd `--set` keys;
    `workers` overrides MQTTD_TEST_WORKERS (mqttd only)."""
    started = []

    def make(workers=None, **settings):
        d = tmp_path / f"broker{len(started)}"
        d.mkdir()
        b = (start_mosquitto(d, settings) if USE_MOSQUITTO
             else start_mqttd(d, settings, workers))
        started.append(b)
        return b

    yield make
    crashed = [b for b in started if not b.stop()]
    assert not crashed, "broker exited during the test (rc=%s):\n%s" % (
        crashed[0].proc.returncode, crashed[0].log_tail())


@pytest.fixture
def broker(broker_factory):
    return broker_factory()


# --------------------------------------------------------------------------
# TLS and WebSocket listeners
# --------------------------------------------------------------------------
@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """Certificates for the TLS tests (certs.Pki), made once per session in a temp dir."""
    from certs import Pki
    return Pki(tmp_path_factory.mktemp("pki"))


def toml_str(s):
    return json.dumps(str(s))  # a TOML basic string


def layered(pki=None, tls=True, ws=True, wss=True, **extra):
    """mqttd settings turning on the tls, ws and wss listeners on free ports, with pki's
    server certificate A (without pki: the broker's generated self-signed one). `extra` keys
    use "_" for ".": layered(pki, tls_min_version='"1.3"')."""
    settings = {}
    for name, on in (("tls", tls), ("ws", ws), ("wss", wss)):
        if on:
            settings[f"{name}.enabled"] = True
            settings[f"{name}.bind"] = toml_str("127.0.0.1:0")
    if pki is not None and (tls or wss):
        settings["tls.cert"] = toml_str(pki.server_a.cert_path)
        settings["tls.key"] = toml_str(pki.server_a.key_path)
    for key, value in extra.items():
        settings[key.replace("_", ".", 1)] = value
    return settings


def tls_context(ca, cert=None, max_version=None, alpn=None):
    """A client SSLContext trusting only the CA certificate file `ca`; `cert`: a
    certs.Issued client certificate to present."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    if cert is not None:
        ctx.load_cert_chain(cert.cert_path, cert.key_path)
    if max_version is not None:
        ctx.maximum_version = max_version
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def recv_seqs(client, topic, n, start=0, timeout=TIMEOUT):
    """Receives messages on `topic` until payloads "start" .. "start+n-1" have all arrived;
    returns every sequence number received, in arrival order (duplicates kept). Fails
    listing the lost ones at the deadline."""
    want = set(range(start, start + n))
    got, others = [], []
    end = time.monotonic() + timeout
    try:
        while want - set(got):
            try:
                msg = client.messages.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                lost = sorted(want - set(got))
                raise AssertionError(f"{client.client_id}: lost {len(lost)} of {n} on "
                                     f"{topic}: {lost[:20]}") from None
            if msg.topic == topic:
                got.append(int(msg.payload))
            else:
                others.append(msg)
    finally:
        for msg in others:  # other topics' messages, kept for their own waits
            client.messages.put(msg)
    return got


def assert_no_worker_died(broker):
    """The supervisor logs "worker exited" when a worker process ends outside a restart."""
    died = [line for line in broker.log_text().splitlines() if "worker exited" in line]
    assert not died, "a worker died:\n" + "\n".join(died)


# --------------------------------------------------------------------------
# paho helper
# --------------------------------------------------------------------------
class Client:
    """Thin synchronous wrapper around paho with queues for every event."""

    def __init__(self, broker, version, client_id=None, clean=True, session_expiry=None,
                 will=None, properties=None, transport="tcp", tls=None, port=None):
        """transport: "tcp", "tls", "ws" or "wss" (the listener connected to); tls, for
        "tls" and "wss": an SSLContext (see tls_context) or a dict of paho's tls_set()
        arguments; port: instead of the broker's port for the transport (e.g.
        broker.tcp_port: always the first host)."""
        self.broker = broker
        self.version = version
        self.v5 = version == mqtt.MQTTv5
        if client_id is None:
            client_id = "c-" + os.urandom(6).hex()
        self.client_id = client_id
        kw = {} if self.v5 else {"clean_session": clean}
        assert transport in ("tcp", "tls", "ws", "wss"), transport
        self.transport = transport
        self.fixed_port = port
        websockets = transport in ("ws", "wss")
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=version, reconnect_on_failure=False,
                             transport="websockets" if websockets else "tcp", **kw)
        if transport in ("tls", "wss"):
            if isinstance(tls, dict):
                self.c.tls_set(**tls)
            else:
                assert isinstance(tls, ssl.SSLContext), "transport tls/wss needs tls=..."
                self.c.tls_set_context(tls)
        self.clean = clean
        self.session_expiry = session_expiry
        self.connect_props = properties
        self.messages = queue.Queue()
        self.connacks = queue.Queue()
        self.disconnects = queue.Queue()
        self.acks = {}  # mid -> queue of (kind, payload)
        self._lock = threading.Lock()
        if will:
            self.c.will_set(**will)
        self.c.on_connect = lambda c, u, flags, rc, props: self.connacks.put((flags, rc, props))
        self.c.on_disconnect = lambda c, u, flags, rc, props: self.disconnects.put((rc, props, flags))
        self.c.on_message = lambda c, u, msg: self.messages.put(msg)
        self.c.on_subscribe = lambda c, u, mid, rcs, props: self._ack(mid, rcs)
        self.c.on_unsubscribe = lambda c, u, mid, rcs, props: self._ack(mid, rcs)
        self.c.on_publish = lambda c, u, mid, rc, props: self._ack(mid, rc)

    def _ackq(self, mid):
        with self._lock:
            return self.acks.setdefault(mid, queue.Queue())

    def _ack(self, mid, value):
        self._ackq(mid).put(value)

    def _wait_ack(self, mid, what):
        try:
            return self._ackq(mid).get(timeout=TIMEOUT)
        except queue.Empty:
            raise AssertionError(f"no {what} for mid {mid} within {TIMEOUT}s") from None

    def _connect_args(self):
        kw = {"keepalive": 60}
        if self.v5:
            kw["clean_start"] = self.clean
            props = self.connect_props or Properties(PacketTypes.CONNECT)
            if self.session_expiry is not None:
                props.SessionExpiryInterval = self.session_expiry
            kw["properties"] = props
        return kw

    def _port(self):
        if self.fixed_port is not None:
            return self.fixed_port
        if self.transport == "tcp":
            return self.broker.port
        port = getattr(self.broker, f"{self.transport}_port")
        assert port, f"the broker has no {self.transport} listener"
        return port

    def connect(self, start_loop=True):
        """Connect and wait for CONNACK. Returns (flags, reason_code, properties)."""
        self.c.connect(self.broker.host, self._port(), **self._connect_args())
        if start_loop:
            self.c.loop_start()
            try:
                return self.connacks.get(timeout=TIMEOUT)
            except queue.Empty:
                raise AssertionError("no CONNACK within deadline") from None
        end = time.monotonic() + TIMEOUT
        while time.monotonic() < end:
            self.c.loop(0.05)
            try:
                return self.connacks.get_nowait()
            except queue.Empty:
                pass
        raise AssertionError("no CONNACK within deadline")

    def connect_refused(self):
        """Connects expecting no CONNACK: the TLS handshake fails (the ssl.SSLError, or the
        OSError after an alert, is returned) or the connection is closed before a CONNACK
        (the disconnect reason is returned)."""
        try:
            self.c.connect(self.broker.host, self._port(), **self._connect_args())
        except (ssl.SSLError, OSError) as e:
            return e
        self.c.loop_start()
        end = time.monotonic() + TIMEOUT
        while time.monotonic() < end:
            try:
                flags, rc, _ = self.connacks.get_nowait()
                raise AssertionError(f"CONNACK {rc} for a connection that must be refused")
            except queue.Empty:
                pass
            try:
                rc, _, _ = self.disconnects.get(timeout=0.05)
                return rc
            except queue.Empty:
                pass
        raise AssertionError("connection neither refused nor acknowledged within deadline")

    def subscribe(self, topic, qos=0, **opts):
        """Subscribe and wait for SUBACK; returns the reason code list."""
        props = opts.pop("properties", None)
        if self.v5:
            sub = SubscribeOptions(qos=qos, **opts)
            rc, mid = self.c.subscribe(topic, options=sub, properties=props)
        else:
            rc, mid = self.c.subscribe(topic, qos)
        assert rc == mqtt.MQTT_ERR_SUCCESS
        rcs = self._wait_ack(mid, "SUBACK")
        assert all(not r.is_failure for r in rcs), f"subscribe {topic} refused: {rcs}"
        return rcs

    def unsubscribe(self, topic):
        rc, mid = self.c.unsubscribe(topic)
        assert rc == mqtt.MQTT_ERR_SUCCESS
        return self._wait_ack(mid, "UNSUBACK")

    def publish(self, topic, payload, qos=0, retain=False, properties=None, wait=True):
        info = self.c.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, info.rc
        if wait:
            self._wait_ack(info.mid, "PUBACK/PUBCOMP" if qos else "send")
        return info

    def recv(self, timeout=TIMEOUT):
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no message received within {timeout}s") from None

    def recv_until(self, marker_payload, timeout=TIMEOUT):
        """Collect messages until one with marker payload; returns those before it."""
        before = []
        end = time.monotonic() + timeout
        while True:
            msg = self.recv(max(0.01, end - time.monotonic()))
            if msg.payload == marker_payload:
                return before
            before.append(msg)

    def wait_disconnect(self, timeout=TIMEOUT):
        try:
            return self.disconnects.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("client was not disconnected within deadline") from None

    def disconnect(self):
        self.c.disconnect()
        self.c.loop_stop()

    def close(self):
        try:
            self.c.disconnect()
        except Exception:
            pass
        self.c.loop_stop()


@pytest.fixture
def clients():
    """clients(broker, version, **kw) -> Client; all closed at teardown."""
    made = []

    def make(broker, version, **kw):
        cl = Client(broker, version, **kw)
        made.append(cl)
        return cl

    yield make
    for cl in made:
        cl.close()


@pytest.fixture
def connected(clients):
    """connected(broker, version, **kw) -> connected Client."""

    def make(broker, version, **kw):
        cl = clients(broker, version, **kw)
        flags, rc, _ = cl.connect()
        assert rc == 0, f"CONNACK refused: {rc}"
        return cl

    return make


# --------------------------------------------------------------------------
# mosquitto_pub / mosquitto_sub helpers
# --------------------------------------------------------------------------
class Proc:
    """A subprocess whose stdout lines are pumped into a queue."""

    def __init__(self, args):
        self.args = args
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines = queue.Queue()
        self.all = []
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.pump.start()

    def _pump(self):
        for raw in self.p.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.all.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_line(self, pred, timeout=TIMEOUT):
        """Wait for a stdout line satisfying pred; returns it."""
        end = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                line = None
            if line is not None and pred(line):
                return line
            if line is None:
                raise AssertionError(f"{self.args[0]}: no matching line; output so far: {self.all}")

    def wait(self, timeout=TIMEOUT):
        try:
            rc = self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.args} did not exit; output: {self.all}") from None
        self.pump.join(timeout=TIMEOUT)  # all output collected in self.all
        return rc

    def kill(self, sig=signal.SIGKILL):
        if self.p.poll() is None:
            os.kill(self.p.pid, sig)
        self.p.wait(timeout=TIMEOUT)


@pytest.fixture
def procs():
    started = []

    def run(*args):
        p = Proc(list(args))
        started.append(p)
        return p

    yield run
    for p in started:
        p.kill()


def mosq_pub(broker, version, *args):
    """Run mosquitto_pub to completion; assert success."""
    cmd = ["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-V", version, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, f"{cmd} failed rc={r.returncode}: {r.stdout}{r.stderr}"
    return r


def require_tools(*tools):
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing tools: {missing}")
