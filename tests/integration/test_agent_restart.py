"""A device away for several rounds (its persistent session kept at the broker) comes back and
trains only the round that is open then, never one that closed while it was away: its
subscriptions to model and task are QoS 0, so the broker queues none of the tasks published
meanwhile and sends the retained current one (docs/operations.md, Restarts)."""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest

from simulation.datasets import make_federated
from tests.integration.fleet_helpers import wait_until

pytestmark = pytest.mark.integration


def test_a_restarted_agent_trains_only_the_current_round(
    fleet_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: dev-2 holds v0 and leaves; dev-0 and dev-1 run rounds without it
    data = make_federated("digits", 3, "iid", seed=0)
    fleet = fleet_factory(data, rounds=5, target_devices=3, min_devices=2, round_timeout=30)
    agg = fleet.aggregator
    fleet.start_aggregator()
    away = fleet.add_agent(2)
    wait_until(lambda: away.model is not None, 20, "dev-2 holds v0")
    away.stop()
    wait_until(lambda: "dev-2" not in agg.online, 10, "dev-2 offline")
    fleet.add_agent(0)
    fleet.add_agent(1)
    wait_until(lambda: agg.version >= 2, 60, "two versions without dev-2")
    # Execute: dev-2 comes back with its state directory and its broker session
    with caplog.at_level(logging.INFO, logger="edge_agent.agent"):
        wait_until(lambda: agg.round is not None, 20, "an open round")
        assert agg.round is not None
        current = agg.round.round
        fleet.add_agent(2)
        wait_until(agg.done.is_set, 90, "five versions")
    # Assert
    trained = [
        int(m.group(1))
        for r in caplog.records
        if (m := re.fullmatch(r"dev-2: round (\d+): trained .*", r.getMessage()))
    ]
    assert trained, "dev-2 never trained after its restart"
    assert min(trained) >= current > 2, (trained, current)  # rounds 1 and 2 closed meanwhile
    assert any("dev-2" in r["counted"] for r in fleet.records)
