"""fedge_cli/pki/fleets.py on disk: a second fleet's identities, registry and ACL, and device
ids that stay one broker identity across fleets (the over-the-broker test is
tests/integration/test_fleets.py)."""

from __future__ import annotations

import json
import os
import pwd
from pathlib import Path

import pytest

from fedge.errors import ConfigError
from fedge_cli import pki
from fedge_cli.pki.acl import acl_users
from fedge_cli.pki.fleets import fleet_identities


@pytest.fixture
def ca(tmp_path: Path) -> pki.CaDir:
    ca = pki.init_ca(tmp_path / "ca", fleet="a")
    pki.add_fleet(ca.root, "b")
    return ca


def test_a_fleet_gets_its_own_identities_and_acl_sections(ca: pki.CaDir) -> None:
    b = fleet_identities(ca, "b")
    for ident, name in ((b.aggregator, "aggregator.b"), (b.monitor, "monitor.b")):
        assert json.loads((ident / "identity.json").read_text())["username"] == name
        assert (ident / "password").stat().st_mode & 0o077 == 0
    # fedge ca init made the first fleet's monitor password too
    assert (ca.monitor / "password").read_text()
    passwd = {ln.split(":", 1)[0] for ln in ca.passwd.read_text().splitlines()}
    assert {"aggregator", "monitor", "aggregator.b", "monitor.b"} <= passwd
    assert {"aggregator", "monitor", "aggregator.b", "monitor.b"} <= acl_users(ca.acl.read_text())
    assert json.loads(ca.fleet_record.read_text())["fleet"] == "a"


def test_rendering_the_broker_config_again_keeps_the_added_fleets(
    ca: pki.CaDir, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    pki.write_broker_config(
        ca.root, tmp_path / "m.conf", data_dir=data, log_file=tmp_path / "m.log", port=1,
        mtls_port=2, bind="127.0.0.1", user=pwd.getpwuid(os.geteuid()).pw_name, fleet="a2",
    )  # fmt: skip
    acl = ca.acl.read_text()
    assert "topic readwrite fedge/a2/#" in acl
    assert "topic readwrite fedge/b/#" in acl
    assert "user aggregator.b" in acl


def test_a_device_id_is_one_identity_across_fleets(ca: pki.CaDir, tmp_path: Path) -> None:
    pki.enroll(ca.root, "dev1", tmp_path / "dev1", fleet="b")
    with pytest.raises(ConfigError, match="already enrolled"):
        pki.enroll(ca.root, "dev1", tmp_path / "again")  # would replace its password
    # revoked without naming its fleet: its key leaves fleet b's registry
    pki.revoke(ca.root, "dev1")
    b = fleet_identities(ca, "b")
    assert not (b.keys / "devices" / "dev1.pub").exists()
    assert list((b.keys / "revoked").glob("dev1-*.pub"))


def test_an_unknown_fleet_is_refused(ca: pki.CaDir, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fedge ca fleet c"):
        pki.enroll(ca.root, "dev2", tmp_path / "dev2", fleet="c")
