"""Attack: a device enrolled under a name the broker's ACL gives more rights (issue 17, item 8).

``fedge enroll aggregator-1`` used to be accepted; under ``broker_config/acl.sharded`` that
identity then read every device's updates. The test mounts the attack on the production
profile (TLS, passwords, the sharded ACL) with whatever the enrolment produced.
"""

from __future__ import annotations

import queue
import shutil
from pathlib import Path

import pytest

from fedge_cli import pki
from simulation.broker import CONFIG_DIR
from tests.integration.test_broker_security import (
    ACCEPTED,
    Client,
    Fleet,
    _fedge,
    _free_port,
    find_mosquitto,
)

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("worker", ["aggregator-1", "aggregator-3"])
def test_a_device_cannot_take_a_shard_worker_name(tmp_path: Path, worker: str) -> None:
    from simulation.broker import MosquittoBroker

    find_mosquitto()
    # Prepare: a CA whose broker runs the sharded ACL, one genuine device
    ca = pki.init_ca(tmp_path / "ca")
    shutil.copyfile(CONFIG_DIR / "acl.sharded", ca.acl)
    pki.enroll(ca.root, "dev1", tmp_path / "dev1")
    # Execute: enrol a "device" under a worker's name, then use what came out
    out = tmp_path / worker
    cli = _fedge("enroll", worker, "--ca", str(ca.root), "--out", str(out))
    mtls_port = _free_port()
    template = tmp_path / "production.conf"
    template.write_text(pki.render_broker_config(ca.root, mtls_port=mtls_port, bind="127.0.0.1"))
    with MosquittoBroker(tmp_path / "broker", template=template, acl=ca.acl) as broker:
        fleet = Fleet(ca, broker, mtls_port, tmp_path)
        stolen = (out / "password").read_text() if (out / "password").exists() else "guess"
        spy = Client(fleet, username=worker, password=stolen)
        dev1 = Client(fleet, username="dev1", password=fleet.password("dev1"))
        try:
            if spy.connected:
                spy.subscribe("fedge/+/update/+")
            assert dev1.publish("fedge/default/update/dev1", b"private update") in ACCEPTED
            try:
                leaked: tuple[str, bytes, bool] | None = spy.messages.get(timeout=1.0)
            except queue.Empty:
                leaked = None
        finally:
            spy.close()
            dev1.close()
    # Assert: nothing read on the broker; refused with a reason, no credentials written
    assert leaked is None
    assert not spy.connected
    assert cli.returncode != 0
    assert "has its own section in a broker ACL" in cli.stderr
    assert "Traceback" not in cli.stderr
    assert not (out / "password").exists()


def test_privileged_names_come_from_the_acl_files(tmp_path: Path) -> None:
    acl = tmp_path / "acl"
    acl.write_text("pattern read fedge/+/model/#\nuser aggregator\ntopic readwrite fedge/#\n"
                   "  user  relay-7 \ntopic read fedge/+/update/+\n")  # fmt: skip

    names = pki.privileged_names([acl])

    assert {"aggregator", "relay-7"} <= names
    assert {f"aggregator-{i}" for i in range(4)} <= names  # from the shipped acl.sharded
    assert "dev1" not in names
