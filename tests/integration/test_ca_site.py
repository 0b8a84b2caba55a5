"""``fedge ca site``: a central and a site broker configured only from what it wrote bridge
over TLS with the site's password, and a device of the site cannot publish upstream; the
reserved names; the site's block survives a re-rendered central ACL."""

from __future__ import annotations

import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedge.errors import ConfigError
from fedge_cli import pki
from fedge_cli.main import main
from fedge_cli.pki.sites import render_site_broker_config, site_files
from simulation.broker import MosquittoBroker
from tests.integration.test_sites_bridge import _Client

pytestmark = pytest.mark.integration

FLEET = "plant"
P = f"fedge/{FLEET}"
WAIT = 10.0
DENIED = 0x87


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def clients() -> Iterator[list[_Client]]:
    made: list[_Client] = []
    yield made
    for c in made:
        c.close()


def test_enroll_refuses_the_names_of_sites_and_gateways(tmp_path: Path) -> None:
    ca = pki.init_ca(tmp_path / "ca", fleet=FLEET)
    for name in ("gw-a", "site-a", "gw-anything", "site-x1"):
        with pytest.raises(ConfigError, match="fedge ca site"):
            pki.enroll(ca.root, name, tmp_path / name)
    pki.enroll(ca.root, "gwa", tmp_path / "gwa")  # only the prefixes with the dash
    pki.add_site(ca.root, "a")
    # Made by `ca site`, the site's identities are revocable like any other.
    assert pki.revoke(ca.root, "gw-a")
    with pytest.raises(ConfigError, match="already"):
        pki.add_site(ca.root, "a")


def test_ca_site_writes_the_site_and_a_central_block_that_survives_a_new_fleet(
    tmp_path: Path,
) -> None:
    ca = pki.init_ca(tmp_path / "ca", fleet=FLEET)
    main(["ca", "site", "b", "--dir", str(ca.root), "--central-host", "central.example"])
    f = site_files(ca, "b")
    assert stat.S_IMODE(f.bridge_conf.stat().st_mode) == 0o600
    bridge = f.bridge_conf.read_text()
    password = (f.bridge / "password").read_text().strip()
    assert "address central.example:8883" in bridge
    assert f"remote_password {password}" in bridge
    assert f"topic fedge/{FLEET}/partial/gw-b out 1" in bridge
    assert "{" not in bridge
    site_acl = f.acl.read_text()
    assert "user gw-b" in site_acl
    assert f"topic write fedge/{FLEET}/partial/gw-b" in site_acl
    assert "{" not in site_acl
    assert "fedge/+/" not in site_acl
    assert (f.gateway / "aggregator.pub").read_bytes() == (
        ca.aggregator / "signing.pub"
    ).read_bytes()
    central = ca.acl.read_text()
    assert "user site-b" in central
    assert f"topic write fedge/{FLEET}/partial/gw-b" in central
    main(["ca", "fleet", "other", "--dir", str(ca.root)])  # re-renders the whole ACL
    central = ca.acl.read_text()
    assert "user site-b" in central
    assert "user aggregator.other" in central
    out = tmp_path / "site-b.conf"
    (tmp_path / "data").mkdir()
    main(
        [
            "ca",
            "broker-config",
            "--dir",
            str(ca.root),
            "--site",
            "b",
            "--out",
            str(out),
            "--data-dir",
            str(tmp_path / "data"),
            "--log-file",
            str(tmp_path / "m.log"),
            "--user",
            "root",
        ]
    )
    conf = out.read_text()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert f"acl_file {f.acl}" in conf
    assert f"certfile {f.server_crt}" in conf
    assert "connection site-b" in conf
    assert "{" not in conf


def test_brokers_configured_by_ca_site_bridge_over_tls_and_keep_devices_local(
    tmp_path: Path, clients: list[_Client]
) -> None:
    ca = pki.init_ca(tmp_path / "ca", fleet=FLEET)
    central_tpl = tmp_path / "central.conf"
    central_tpl.write_text(
        pki.render_broker_config(ca.root, mtls_port=_free_port(), bind="127.0.0.1")
    )
    central = MosquittoBroker(tmp_path / "central", template=central_tpl, acl=ca.acl)
    f = pki.add_site(ca.root, "a", central_host="127.0.0.1", central_port=central.port)
    pki.enroll(ca.root, "dev-a1", tmp_path / "dev-a1")
    site_tpl = tmp_path / "site.conf"
    site_tpl.write_text(
        render_site_broker_config(
            ca.root, "a", pki.PRODUCTION_TEMPLATE, mtls_port=_free_port(), bind="127.0.0.1"
        )
    )
    tls = {"ca_certs": str(ca.ca_crt)}
    with central, MosquittoBroker(tmp_path / "site", template=site_tpl, acl=f.acl) as site:
        end = time.monotonic() + WAIT
        while "as site-a " not in central.log_path.read_text():
            assert time.monotonic() < end, central.log_path.read_text()[-2000:]
            time.sleep(0.05)
        agg_pw = (ca.aggregator / "password").read_text()
        centre = _Client(central.port, pki.AGGREGATOR, agg_pw, **tls)
        clients.append(centre)
        centre.subscribe(f"{P}/#")
        centre.publish(f"{P}/round/current", b"task-tls", retain=True)
        centre.publish(f"{P}/model/patch/3", b"patch-3", retain=True)
        gw = _Client(site.port, f.gateway_name, (f.gateway / "password").read_text(), **tls)
        dev = _Client(site.port, "dev-a1", (tmp_path / "dev-a1" / "password").read_text(), **tls)
        clients.extend([gw, dev])
        gw.subscribe(f"{P}/round/current")
        dev.subscribe(f"{P}/model/#")
        gw.wait_for(f"{P}/round/current", b"task-tls")
        assert dev.wait_for(f"{P}/model/patch/3", b"patch-3")[2] is True  # retained
        assert gw.publish(f"{P}/partial/gw-a", b"partial-tls") < 0x80
        centre.wait_for(f"{P}/partial/gw-a", b"partial-tls")
        # The device: its update stays at the site, the gateway's and the centre's topics are
        # refused at the site broker.
        assert dev.publish(f"{P}/update/dev-a1", b"mine") < 0x80
        for topic in (f"{P}/partial/gw-a", f"{P}/round/current", f"{P}/model/global"):
            assert dev.publish(topic, b"forged") == DENIED, topic
        # The bridge identity at the centre speaks only for its own gateway.
        bridge = _Client(central.port, f.bridge_name, (f.bridge / "password").read_text(), **tls)
        clients.append(bridge)
        assert bridge.publish(f"{P}/partial/gw-b", b"forged") == DENIED
        assert bridge.publish(f"{P}/round/current", b"forged") == DENIED
        time.sleep(1.0)
        assert not [m for m in centre.got if m[1] in (b"forged", b"mine")]
        centre.publish(f"{P}/round/current", b"", retain=True)
        centre.publish(f"{P}/model/patch/3", b"", retain=True)
