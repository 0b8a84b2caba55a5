"""The production broker as a service manager runs it: started as root, it drops to the
``mosquitto`` user, which reads the password file through its group. An operator revokes a
device and reloads the broker (SIGHUP), as docs/operations.md says; every other identity must
still get in. (Seen in the field: the revoke rewrote the password file as root:root 0640, the
broker logged ``Unable to open pwfile`` and refused every client, the aggregator included.)

Everything the broker touches lives in a fresh directory under /tmp that the ``mosquitto``
user can traverse (pytest's own temp dirs are 0700 root), removed afterwards.
"""

from __future__ import annotations

import grp
import os
import pwd
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fedge_cli import pki
from simulation.broker import MosquittoNotFound, find_mosquitto

pytestmark = pytest.mark.integration

WAIT = 10.0
USER = "mosquitto"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(path: Path, text: str, offset: int = 0) -> None:
    deadline = time.monotonic() + WAIT
    while text not in (path.read_text(errors="replace")[offset:] if path.exists() else ""):
        assert time.monotonic() < deadline, f"broker never logged {text!r}"
        time.sleep(0.05)


def _connack(port: int, ca_crt: Path, username: str, password: str) -> int | None:
    """The CONNACK reason code this identity gets over TLS, or None if none came."""
    got: queue.Queue[int] = queue.Queue()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=username, protocol=mqtt.MQTTv5)
    c.username_pw_set(username, password)
    c.tls_set(ca_certs=str(ca_crt))
    c.on_connect = lambda _c, _u, _f, rc, _p: got.put(rc.value)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        return got.get(timeout=WAIT)
    except queue.Empty:
        return None
    finally:
        c.disconnect()
        c.loop_stop()


@pytest.fixture
def service_dir() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("the broker drops to another user only when started as root")
    try:
        pwd.getpwnam(USER)
        find_mosquitto()
    except KeyError:
        pytest.skip(f"no {USER!r} user (Debian's mosquitto package creates it)")
    except MosquittoNotFound as exc:
        pytest.skip(str(exc))
    root = Path(tempfile.mkdtemp(prefix="fedge-service-user-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_revoke_and_reload_keep_every_other_identity_connected(service_dir: Path) -> None:
    # Prepare: a CA, two devices, the files the broker reads given to its group, as the
    # deployment guide says; the config rendered by `fedge ca broker-config`'s code.
    ca = pki.init_ca(service_dir / "ca")
    for device in ("dev1", "dev2"):
        pki.enroll(ca.root, device, service_dir / device)
    gid = grp.getgrnam(USER).gr_gid
    for f in (ca.passwd, ca.server_key):
        os.chown(f, 0, gid)
    state = service_dir / "state"
    state.mkdir()
    os.chown(state, pwd.getpwnam(USER).pw_uid, gid)
    port, config, log = _free_port(), service_dir / "mosquitto.conf", state / "mosquitto.log"
    pki.write_broker_config(
        ca.root, config, data_dir=state, log_file=log, port=port, mtls_port=_free_port(),
        bind="127.0.0.1", user=USER,
    )  # fmt: skip
    broker = subprocess.Popen(
        [find_mosquitto(), "-c", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(log, "running")
        password = {d: (service_dir / d / "password").read_text() for d in ("dev1", "dev2")}
        agg_password = (ca.aggregator / "password").read_text()
        before = _connack(port, ca.ca_crt, "dev1", password["dev1"])

        # Execute: revoke dev2, reload the broker
        pki.revoke(ca.root, "dev2")
        offset = log.stat().st_size
        os.kill(broker.pid, signal.SIGHUP)
        _wait_for(log, "Reloading config", offset)

        # Assert: the others still get in, the revoked one does not
        assert before == 0
        assert _connack(port, ca.ca_crt, "dev1", password["dev1"]) == 0
        assert _connack(port, ca.ca_crt, pki.AGGREGATOR, agg_password) == 0
        assert _connack(port, ca.ca_crt, "dev2", password["dev2"]) == 0x87  # no entry any more
        assert "Unable to open pwfile" not in log.read_text()
        st = ca.passwd.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, gid, 0o640)
    finally:
        broker.terminate()
        broker.wait(timeout=WAIT)


def _fedge(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedge_cli.main", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_broker_config_as_a_conf_d_include_of_the_stock_config(service_dir: Path) -> None:
    """`fedge ca broker-config --include`, run with relative paths as an operator does, drops
    into a Debian-stock layout (main config with pid_file, persistence, persistence_location,
    log_dest and include_dir); the broker is started from / as systemd does, drops to its
    user, and reloads on SIGHUP. (Seen in the field: relative paths, a 0600 root config that
    every reload failed to open, and a duplicate persistence_location that made it exit.)"""
    # Prepare: the CA and the stock-like main config
    init = _fedge(service_dir, "ca", "init", "--dir", "ca")
    assert init.returncode == 0, init.stderr
    ca = pki.CaDir(service_dir / "ca")
    gid = grp.getgrnam(USER).gr_gid
    for f in (ca.passwd, ca.server_key):
        os.chown(f, 0, gid)
    state = service_dir / "state"
    state.mkdir()
    os.chown(state, pwd.getpwnam(USER).pw_uid, gid)
    (service_dir / "conf.d").mkdir()
    log = state / "mosquitto.log"
    main = service_dir / "mosquitto.conf"
    main.write_text(
        f"pid_file {state}/mosquitto.pid\n"
        "persistence true\n"
        f"persistence_location {state}/\n"
        f"log_dest file {log}\n"
        f"include_dir {service_dir}/conf.d\n"
    )
    port = _free_port()
    # Execute: render the include with relative paths, start the broker from /, reload it
    rendered = _fedge(
        service_dir, "ca", "broker-config", "--dir", "ca", "--include",
        "--out", "conf.d/fedge.conf", "--port", str(port), "--mtls-port", str(_free_port()),
        "--bind", "127.0.0.1", "--user", USER,
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    broker = subprocess.Popen(
        [find_mosquitto(), "-c", str(main)],
        cwd="/",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(log, "running")
        agg_password = (ca.aggregator / "password").read_text()
        before = _connack(port, ca.ca_crt, pki.AGGREGATOR, agg_password)
        offset = log.stat().st_size
        os.kill(broker.pid, signal.SIGHUP)
        _wait_for(log, "Reloading config", offset)
        after = _connack(port, ca.ca_crt, pki.AGGREGATOR, agg_password)

        # Assert: it runs and reloads; the include's paths are absolute, world-readable
        assert (before, after) == (0, 0)
        assert "Unable to open" not in log.read_text()
        assert broker.poll() is None
        conf = service_dir / "conf.d" / "fedge.conf"
        assert conf.stat().st_mode & 0o777 == 0o644
        files = ("password_file", "acl_file", "cafile", "certfile", "keyfile", "crlfile")
        words = [line.split() for line in conf.read_text().splitlines()]
        paths = [w[1] for w in words if w and w[0] in files]
        assert len(paths) == 9, paths  # three TLS files per listener, the CRL, passwd, ACL
        assert all(Path(p).is_absolute() for p in paths)
    finally:
        broker.terminate()
        broker.wait(timeout=WAIT)


def test_broker_config_names_one_command_that_makes_the_ca_files_readable(
    service_dir: Path,
) -> None:
    """A fresh CA's broker files are root's: `broker-config` refuses them with one line whose
    command fixes all of them at once (it named server.key alone, then the password file on
    the next run, then the CRL)."""
    # Prepare: a CA as `fedge ca init` leaves it, owned by root
    assert _fedge(service_dir, "ca", "init", "--dir", "ca").returncode == 0
    args = ("ca", "broker-config", "--dir", "ca", "--include", "--out", "fedge.conf")
    # Execute: render, run the command the error names, render again
    refused = _fedge(service_dir, *args)
    broker_dir = (service_dir / "ca" / "broker").resolve()
    fix = f"chown -R {USER}: {broker_dir}"
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip().endswith(f"run: {fix}"), refused.stderr
    subprocess.run(fix.split(), check=True)
    rendered = _fedge(service_dir, *args)
    # Assert: one run of it was enough
    assert rendered.returncode == 0, rendered.stderr
    assert (service_dir / "fedge.conf").is_file()
