"""The wrong port or the wrong TLS files: every role says what is wrong in one line, within
seconds, instead of retrying silently (fedge/transport/probe.py).

Against a real Mosquitto (``production.conf``: a TLS listener; ``local``: plain MQTT) and plain
TCP listeners the tests open: one that never answers, one that answers like a web server.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedge.errors import BrokerUnavailable, InvalidValue
from fedge.support.config_io import tls_context
from fedge.transport.mqtt import BrokerURL, probe_broker
from fedge_cli import pki
from simulation.broker import MosquittoBroker, MosquittoNotFound, find_mosquitto
from tests.integration.test_cli import assert_one_line_error

pytestmark = pytest.mark.integration

FAST = 8.0  # seconds a failing start may take, probe (3 s) and interpreter start included


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MosquittoBroker, Path]]:
    """``production.conf`` on loopback: the broker (its ``port`` the TLS + password listener)
    and the CA certificate; the mutual-TLS port is ``MTLS_PORT[broker.port]``."""
    try:
        find_mosquitto()
    except MosquittoNotFound as exc:
        pytest.skip(str(exc))
    root = tmp_path_factory.mktemp("tls")
    ca = pki.init_ca(root / "ca", fleet="f")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        mtls_port = s.getsockname()[1]
    template = root / "production.conf"
    template.write_text(pki.render_broker_config(ca.root, mtls_port=mtls_port, bind="127.0.0.1"))
    with MosquittoBroker(root / "broker", template=template, acl=ca.acl) as broker:
        MTLS_PORT[broker.port] = mtls_port
        yield broker, ca.ca_crt


MTLS_PORT: dict[int, int] = {}


class Listener:
    """A plain TCP listener on a free loopback port: silent, or answering ``reply``."""

    def __init__(self, reply: bytes | None) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.reply = reply
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)
            if self.reply is not None:
                conn.recv(64)
                conn.sendall(self.reply)

    def close(self) -> None:
        self.sock.close()
        for c in self.held:
            c.close()


@pytest.fixture(params=[None, b"HTTP/1.1 400 Bad Request\r\n\r\n"], ids=["silent", "http"])
def not_mqtt(request: pytest.FixtureRequest) -> Iterator[Listener]:
    listener = Listener(request.param)
    yield listener
    listener.close()


def _timed_probe(url: str, **tls: str | None) -> tuple[str, float]:
    start = time.monotonic()
    with pytest.raises(BrokerUnavailable) as e:
        probe_broker(BrokerURL.parse(url), **tls)
    return str(e.value), time.monotonic() - start


def test_plain_mqtt_against_a_tls_listener_says_use_mqtts(
    tls_broker: tuple[MosquittoBroker, Path],
) -> None:
    broker, _ = tls_broker
    why, took = _timed_probe(f"mqtt://127.0.0.1:{broker.port}")
    assert took < 5
    assert f"mqtt://127.0.0.1:{broker.port}" in why
    assert "use mqtts://" in why


def test_tls_against_a_plain_mqtt_listener_says_use_mqtt(broker: MosquittoBroker) -> None:
    why, took = _timed_probe(f"mqtts://127.0.0.1:{broker.port}", ca_cert=None)
    assert took < 5
    assert "TLS handshake failed" in why
    assert "use mqtt://" in why


def test_a_port_that_is_not_mqtt_is_named(not_mqtt: Listener) -> None:
    why, took = _timed_probe(f"mqtt://127.0.0.1:{not_mqtt.port}")
    assert took < 5
    if not_mqtt.reply is None:
        assert "no MQTT answer" in why
        assert "within 3 s" in why
    else:
        assert "not as an MQTT broker" in why
        assert "HTTP/1.1" in why


def test_the_probe_accepts_real_brokers_plain_and_tls(
    broker: MosquittoBroker, tls_broker: tuple[MosquittoBroker, Path]
) -> None:
    tls, ca_crt = tls_broker
    probe_broker(BrokerURL.parse(broker.url))
    # production refuses anonymous clients (CONNACK 0x87): still a broker
    probe_broker(BrokerURL.parse(f"mqtts://127.0.0.1:{tls.port}"), ca_cert=str(ca_crt))


def test_a_broker_certificate_from_another_ca_names_the_ca_file(
    tls_broker: tuple[MosquittoBroker, Path], tmp_path: Path
) -> None:
    tls, _ = tls_broker
    other = pki.init_ca(tmp_path / "other")
    why, _ = _timed_probe(f"mqtts://127.0.0.1:{tls.port}", ca_cert=str(other.ca_crt))
    assert str(other.ca_crt) in why
    assert "does not verify" in why


def test_tls_without_a_ca_cert_says_which_cas_were_tried(
    tls_broker: tuple[MosquittoBroker, Path],
) -> None:
    tls, _ = tls_broker
    why, _ = _timed_probe(f"mqtts://127.0.0.1:{tls.port}")
    # It said "does not verify against tls.ca_cert (the system CAs)": no tls.ca_cert was given.
    assert "does not verify against the system CAs (no tls.ca_cert given" in why
    assert "--ca-cert" in why  # fedge status's name for it


def test_a_mutual_tls_port_without_a_client_certificate_is_named(
    tls_broker: tuple[MosquittoBroker, Path],
) -> None:
    tls, ca_crt = tls_broker
    url = f"mqtts://127.0.0.1:{MTLS_PORT[tls.port]}"
    why, took = _timed_probe(url, ca_cert=str(ca_crt))
    assert took < 5
    # It said "EOF occurred in violation of protocol (_ssl.c:2427)" or "[SSL:
    # TLSV13_ALERT_CERTIFICATE_REQUIRED] ... (_ssl.c:2580)" (whichever the client read first).
    assert why in (
        f"{url} closed the connection without an MQTT answer "
        "(a mutual-TLS listener? give tls.client_cert and tls.client_key)",
        f"{url}: the broker requires a client certificate (a mutual-TLS listener): "
        "give tls.client_cert and tls.client_key",
    )


@pytest.mark.parametrize("problem", ["missing", "unreadable", "not a certificate"])
def test_unusable_ca_cert_names_the_file(tmp_path: Path, problem: str) -> None:
    path = tmp_path / "ca.crt"
    if problem == "unreadable":
        path.mkdir()  # readable by nobody as a file, root included
    elif problem == "not a certificate":
        path.write_text("hello\n")
    with pytest.raises(InvalidValue) as e:
        tls_context(str(path))
    assert str(e.value).startswith(f"tls.ca_cert {path}: ")


# --- the commands: one line, exit 2, within seconds ---------------------------------------------


def _run(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-m", "fedge_cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    return p, time.monotonic() - start


def _agent_config(tmp_path: Path, broker: str, extra: str = "") -> Path:
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 64), np.float32), y=np.zeros(4, np.int64))
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        f"device_id: dev1\nbroker: {broker}\ndata: {tmp_path / 'd.npz'}\n"
        f"state_dir: {tmp_path / 'state'}\n{extra}"
    )
    return cfg


def test_agent_aggregator_and_status_fail_fast_on_a_tls_port(
    tls_broker: tuple[MosquittoBroker, Path], tmp_path: Path
) -> None:
    broker, _ = tls_broker
    url = f"mqtt://127.0.0.1:{broker.port}"
    agg = tmp_path / "aggregator.yaml"
    agg.write_text(f"broker: {url}\nstate_dir: {tmp_path / 'agg'}\n")
    runs = {
        "agent": _run("agent", "--config", str(_agent_config(tmp_path, url))),
        "aggregator": _run("aggregator", "--config", str(agg)),
        "status": _run("status", "--broker", url, "--fleet", "f"),
    }
    for name, (p, took) in runs.items():
        assert took < FAST, (name, took)
        assert_one_line_error(p, url, "use mqtts://")
    # A service's line names it, as `fedge agent: error:` does (operations.md)
    assert runs["aggregator"][0].stderr.startswith("fedge aggregator: error: ")
    assert runs["agent"][0].stderr.startswith("fedge agent: error: ")
    assert runs["status"][0].stderr.startswith("fedge: error: ")


def test_agent_with_a_missing_ca_cert_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "ca.crt"
    cfg = _agent_config(tmp_path, "mqtts://127.0.0.1:9", f"tls: {{ca_cert: {missing}}}\n")
    p, _ = _run("agent", "--config", str(cfg))
    assert_one_line_error(p, f"tls.ca_cert {missing}: cannot read it")


def test_an_agent_whose_broker_is_not_up_yet_waits_for_it(tmp_path: Path) -> None:
    # Under systemd a device may boot before the network or its broker: nothing listening is
    # not a mistake in the config, and the agent must not exit 2 (RestartPreventExitStatus=2).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    cfg = _agent_config(tmp_path, f"mqtt://127.0.0.1:{port}")
    p = subprocess.Popen(
        [sys.executable, "-m", "fedge_cli.main", "agent", "--config", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            p.wait(6)
    finally:
        p.terminate()
        _, err = p.communicate(timeout=30)
    assert "cannot reach the broker" in err
    assert "retrying in the background" in err
