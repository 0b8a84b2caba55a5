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
