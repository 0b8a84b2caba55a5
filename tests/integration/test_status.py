"""`fedge status` over a real Mosquitto with broker_config/acl: the devices and the open round
as the read-only monitor identity sees them, without disturbing the aggregator."""

from __future__ import annotations

import re
from typing import Any

import pytest

from fedge_cli.main import main
from simulation.datasets import make_federated
from tests.integration.fleet_helpers import wait_until

pytestmark = pytest.mark.integration


def test_status_lists_the_devices_and_the_open_round_and_leaves_the_aggregator_alone(
    fleet_factory: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_federated("digits", 3, "iid", seed=0)
    # A round that cannot close (quorum 3, two devices): it stays open while we look.
    fleet = fleet_factory(data, rounds=3, target_devices=3, min_devices=3, round_timeout=60)
    fleet.start_aggregator()
    fleet.add_agent(0)
    fleet.add_agent(1)
    agg = fleet.aggregator
    wait_until(lambda: len(agg.online) == 2 and agg.round is not None, 20, "two devices, a round")
    fleet.agents["dev-1"].stop()
    wait_until(lambda: agg.online == {"dev-0"}, 10, "dev-1 offline")
    connects = agg.session.connects  # a client taking its id over would force a reconnect

    main(["status", "--broker", str(fleet.url), "--fleet", fleet.topics.fleet, "--wait", "1"])

    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(
        rf"fleet {fleet.topics.fleet}: round 1 open on v0, deadline in \d+ s, codec fp32, "
        r"asks all devices",
        out[0],
    ), out
    assert out[1].split() == ["DEVICE", "STATE", "MODEL", "LAST", "SEEN", "ASKED"]
    assert out[2].split()[:2] == ["dev-0", "online"]
    assert out[3].split()[:3] == ["dev-1", "offline", "v0"]
    assert out[-1] == "2 devices: 1 online, 1 offline"
    # The aggregator kept its session: never dropped, the same round open.
    assert agg.session.connected
    assert agg.session.connects == connects
    assert agg.round is not None
    assert agg.round.round == 1


def test_status_refuses_to_connect_as_the_aggregator() -> None:
    with pytest.raises(SystemExit, match="never connects as aggregator"):
        main(["status", "--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--username",
              "aggregator"])  # fmt: skip
