"""Asynchronous FedBuff over a real Mosquitto: no round barrier, a version every K updates,
slow devices' stale updates accepted within the window and down-weighted."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from edge_agent.trainer import train_local
from models.onnx_weights import read_initializers
from simulation.datasets import FederatedData, make_federated
from tests.integration.fleet_helpers import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def digits4() -> FederatedData:
    return make_federated("digits", 4, "iid", seed=0)


def slow_train(*args: Any, **kw: Any) -> Any:
    time.sleep(0.4)  # a device several times slower than the others
    return train_local(*args, **kw)


def test_fedbuff_publishes_every_k_updates_and_accepts_stale_ones(
    fleet_factory: Any, digits4: FederatedData
) -> None:
    fleet = fleet_factory(
        digits4,
        mode="async",
        async_buffer=2,
        max_staleness=8,
        rounds=10,
        target_devices=4,
        min_devices=1,
        round_timeout=30,
    )
    fleet.start_aggregator()
    slow_pool = ThreadPoolExecutor(1)
    try:
        for i in range(3):
            fleet.add_agent(i)
        fleet.add_agent(3, train_fn=slow_train, executor=slow_pool)

        wait_until(fleet.aggregator.done.is_set, 90, "ten asynchronous versions")
    finally:
        slow_pool.shutdown(cancel_futures=True)

    recs = fleet.records
    assert [r["version"] for r in recs] == list(range(1, 11))
    assert all(r["devices"] == 2 for r in recs)  # K updates per version
    keys = [k for r in recs for k in r["counted"]]
    assert len(keys) == len(set(keys))  # each (device, round) counted once
    assert max(r["staleness_max"] for r in recs) >= 1  # the slow device arrived stale
    assert any(k.startswith("dev-3@") for k in keys), fleet.aggregator.metrics.rejected
    w = read_initializers(fleet.aggregator.registry.path(10).read_bytes())
    assert all(np.isfinite(v).all() for v in w.values())
