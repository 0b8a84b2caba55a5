"""A device whose data does not fit the fleet's model says so in one line, over the broker."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.agent import EdgeAgent
from edge_agent.data import LocalData
from edge_agent.store import AgentStore
from simulation.datasets import make_federated
from tests.integration.fleet_helpers import wait_until

pytestmark = pytest.mark.integration


def test_wrong_width_data_skips_rounds_in_one_line(
    fleet_factory: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: dev-0 fits the 64-feature model; dev-9 was given 784-feature (MNIST) data
    caplog.set_level(logging.INFO, logger="edge_agent.agent")
    data = make_federated("digits", 2, "iid", seed=0)
    fleet = fleet_factory(data, rounds=2, target_devices=2, min_devices=1, round_timeout=3)
    fleet.start_aggregator()
    fleet.add_agent(0)
    wide = EdgeAgent(
        device_id="dev-9",
        mux=fleet.dev_mux,
        broker=fleet.url,
        topics=fleet.topics,
        data=LocalData(np.zeros((8, 784), np.float32), np.zeros(8, np.int64)),
        store=AgentStore(tmp_path / "dev-9"),
        executor=fleet.executor,
    )
    fleet.agents["dev-9"] = wide
    wide.start()

    # Execute
    wait_until(lambda: fleet.aggregator.done.is_set(), 30, "version 2")
    wait_until(lambda: wide.counters.rounds_skipped >= 1, 10, "dev-9 skips a round")

    # Assert: one line when the model arrives, one per skipped round, never a traceback
    mine = [r for r in caplog.records if r.getMessage().startswith("dev-9:")]
    assert not [r for r in mine if r.exc_info], "a traceback was logged"
    errors = [r.getMessage() for r in mine if r.levelno >= logging.ERROR]
    assert errors[0] == (
        "dev-9: model v0: data has 784 features, the model expects 64; fix data: in the config"
    )
    assert "dev-9: skipping round 1: data has 784 features, the model expects 64" in errors
