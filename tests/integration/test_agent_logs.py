"""An agent says at INFO what it does each round: one line per event, over a real Mosquitto."""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest

from simulation.datasets import make_federated
from tests.integration.fleet_helpers import wait_until

pytestmark = pytest.mark.integration


def test_an_agent_logs_model_training_upload_and_receipt_of_each_round(
    fleet_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.agent")
    data = make_federated("digits", 2, "iid", seed=0)
    fleet = fleet_factory(data, rounds=1, target_devices=2, min_devices=2, round_timeout=30)
    fleet.start_aggregator()
    for i in range(2):
        fleet.add_agent(i)
    wait_until(lambda: fleet.aggregator.done.is_set(), 30, "version 1")
    wait_until(
        lambda: all(not a.outbox.pending() for a in fleet.agents.values()), 10, "the receipts"
    )
    # The version reaches the devices after the aggregator is done: wait for dev-0's line.
    wait_until(
        lambda: any(r.getMessage().startswith("dev-0: model v1") for r in list(caplog.records)),
        10,
        "dev-0 logs model v1",
    )

    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dev-0:")]
    v0, v1 = (fleet.aggregator.registry.path(v).stat().st_size for v in (0, 1))
    samples = len(data.parts[0][1])
    assert lines[0] == f"dev-0: model v0 received ({v0} bytes, sha256 ok, unsigned)"
    trained = re.fullmatch(
        rf"dev-0: round 1: trained 2 epochs on {samples} samples in [0-9.]+ s \(loss [0-9.]+\)",
        lines[1],
    )
    assert trained is not None, lines
    sent = re.fullmatch(
        r"dev-0: round 1: sending update (\w{8}): (\d+) bytes, codec fp32", lines[2]
    )
    assert sent is not None, lines
    assert lines[3] == f"dev-0: receipt: update {sent.group(1)} of round 1 counted"
    assert lines[4] == f"dev-0: model v1 received ({v1} bytes, sha256 ok, unsigned)"
    # Every line is one event: nothing else was said at INFO for this round.
    assert len(lines) == 5, lines
