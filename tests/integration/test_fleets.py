"""Two fleets on one production broker (``fedge ca fleet``): each aggregator has its own
identity, both stay connected, and neither can publish the other fleet's model or task.

The broker is ``broker_config/production.conf`` rendered for a CA with fleets ``a`` (the CA's
first, identity ``aggregator``) and ``b`` (added: ``aggregator.b``, ``monitor.b``); clients are
the TLS + password clients of ``test_broker_security``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedge.envelopes import DeviceState, DeviceStatus
from fedge.errors import ConfigError
from fedge_cli import pki
from fedge_cli.main import main
from fedge_cli.pki.fleets import fleet_identities
from simulation.broker import MosquittoBroker, MosquittoNotFound, find_mosquitto
from tests.integration.test_broker_security import (
    ACCEPTED,
    NOT_AUTHORIZED,
    Client,
    Fleet,
    _free_port,
)

pytestmark = pytest.mark.integration


class TwoFleets(Fleet):
    def identity(self, name: str) -> Path:
        fixed = {
            "aggregator": self.ca.aggregator,
            "monitor": self.ca.monitor,
            "aggregator.b": self.ca.fleets / "b" / "aggregator",
            "monitor.b": self.ca.fleets / "b" / "monitor",
        }
        return fixed.get(name, self.root / name)


@pytest.fixture(scope="module")
def fleets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoFleets]:
    try:
        find_mosquitto()
    except MosquittoNotFound as exc:
        pytest.skip(str(exc))
    root = tmp_path_factory.mktemp("fleets")
    ca = pki.init_ca(root / "ca", fleet="a")
    # Through the command, as an operator adds a fleet.
    main(["ca", "fleet", "b", "--dir", str(ca.root)])
    pki.enroll(ca.root, "dev-a", root / "dev-a")
    pki.enroll(ca.root, "dev-b", root / "dev-b", fleet="b")
    mtls_port = _free_port()
    template = root / "production.conf"
    template.write_text(pki.render_broker_config(ca.root, mtls_port=mtls_port, bind="127.0.0.1"))
    with MosquittoBroker(root / "broker", template=template, acl=ca.acl) as broker:
        yield TwoFleets(ca, broker, mtls_port, root)


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    opened: list[Client] = []
    yield opened
    for c in opened:
        c.close()


def connect(clients: list[Client], fleets: TwoFleets, name: str) -> Client:
    c = Client(fleets, username=name, password=(fleets.identity(name) / "password").read_text())
    clients.append(c)
    assert c.connected, (name, c.error)
    return c


def test_each_fleets_aggregator_publishes_its_own_fleet_only(
    fleets: TwoFleets, clients: list[Client]
) -> None:
    # Prepare: both aggregators online at once (the same username would kick each other)
    agg_a = connect(clients, fleets, "aggregator")
    agg_b = connect(clients, fleets, "aggregator.b")
    # Execute
    own = [
        agg_a.publish("fedge/a/model/global", b"model a"),
        agg_a.publish("fedge/a/round/current", b"task a"),
        agg_b.publish("fedge/b/model/global", b"model b"),
        agg_b.publish("fedge/b/round/current", b"task b"),
    ]
    cross = [
        agg_a.publish("fedge/b/model/global", b"FORGED", retain=True),
        agg_a.publish("fedge/b/round/current", b"FORGED", retain=True),
        agg_b.publish("fedge/a/model/global", b"FORGED", retain=True),
        agg_b.publish("fedge/a/round/current", b"FORGED", retain=True),
        agg_b.publish("fedge/a/receipt/dev-a", b"FORGED"),
    ]
    # Assert
    assert all(code in ACCEPTED for code in own), own
    assert cross == [NOT_AUTHORIZED] * len(cross)
    assert agg_a.connected
    assert agg_b.connected


def test_an_aggregator_reads_the_updates_of_its_own_fleet_only(
    fleets: TwoFleets, clients: list[Client]
) -> None:
    agg_b = connect(clients, fleets, "aggregator.b")
    agg_b.subscribe("fedge/+/update/+")
    dev_a = connect(clients, fleets, "dev-a")
    dev_b = connect(clients, fleets, "dev-b")
    # Execute: each device writes its own update topic in its fleet
    assert dev_a.publish("fedge/a/update/dev-a", b"from a") in ACCEPTED
    assert dev_b.publish("fedge/b/update/dev-b", b"from b") in ACCEPTED
    # Assert: aggregator.b sees fleet b's update, never fleet a's
    assert agg_b.next_message() == ("fedge/b/update/dev-b", b"from b", False)
    assert agg_b.messages.empty()


def test_a_fleets_monitor_reads_its_statuses_and_writes_nothing(
    fleets: TwoFleets, clients: list[Client]
) -> None:
    dev_b = connect(clients, fleets, "dev-b")
    assert dev_b.publish("fedge/b/status/dev-b", b"online", retain=True) in ACCEPTED
    monitor = connect(clients, fleets, "monitor.b")
    monitor.subscribe("fedge/b/status/+")
    got = monitor.next_message()
    writes = [
        monitor.publish(f"fedge/{f}/{kind}/monitor.b", b"x")
        for f in ("a", "b")
        for kind in ("update", "status")
    ]
    dev_b.publish("fedge/b/status/dev-b", b"", retain=True)
    assert got == ("fedge/b/status/dev-b", b"online", True)
    assert writes == [NOT_AUTHORIZED] * 4


def test_fleet_identities_are_service_names_not_devices(fleets: TwoFleets) -> None:
    ids = fleet_identities(fleets.ca, "b")
    # A device of fleet b trusts fleet b's aggregator and is trusted by it only.
    assert (fleets.root / "dev-b" / "aggregator.pub").read_bytes() == (
        ids.aggregator / "signing.pub"
    ).read_bytes()
    assert (ids.keys / "devices" / "dev-b.pub").exists()
    assert not (fleets.ca.keys / "devices" / "dev-b.pub").exists()
    with pytest.raises(ConfigError, match="own section in a broker ACL"):
        pki.enroll(fleets.ca.root, "aggregator.b", fleets.root / "x")
    with pytest.raises(ConfigError, match="already in the CA"):
        pki.add_fleet(fleets.ca.root, "b")


def test_fedge_status_reads_a_fleet_as_its_monitor_over_tls(
    fleets: TwoFleets, clients: list[Client], capsys: pytest.CaptureFixture[str]
) -> None:
    dev_b = connect(clients, fleets, "dev-b")
    status = DeviceStatus("dev-b", DeviceState.ONLINE, 3, ts=time.time()).to_bytes()
    assert dev_b.publish("fedge/b/status/dev-b", status, retain=True) in ACCEPTED
    monitor = fleets.identity("monitor.b")

    main(["status", "--broker", f"mqtts://127.0.0.1:{fleets.broker.port}", "--fleet", "b",
          "--username", "monitor.b", "--password-file", str(monitor / "password"),
          "--ca-cert", str(fleets.ca.ca_crt), "--wait", "1"])  # fmt: skip

    dev_b.publish("fedge/b/status/dev-b", b"", retain=True)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "fleet b: no round task published"
    assert out[2].split()[:3] == ["dev-b", "online", "v3"]
    assert out[-1] == "1 devices: 1 online, 0 offline"
