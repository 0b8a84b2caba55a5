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
        # Wide enough that the slow device's first update is still accepted when the fast
        # three produce versions quickly (a loaded 2-core run refused it as too_stale at 8).
        max_staleness=32,
        rounds=16,
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

        wait_until(fleet.aggregator.done.is_set, 90, "sixteen asynchronous versions")
    finally:
        slow_pool.shutdown(cancel_futures=True)

    recs = fleet.records
    assert [r["version"] for r in recs] == list(range(1, 17))
    assert all(r["devices"] == 2 for r in recs)  # K updates per version
    keys = [k for r in recs for k in r["counted"]]
    assert len(keys) == len(set(keys))  # each (device, round) counted once
    assert max(r["staleness_max"] for r in recs) >= 1  # the slow device arrived stale
    assert any(k.startswith("dev-3@") for k in keys), fleet.aggregator.metrics.rejected
    w = read_initializers(fleet.aggregator.registry.path(16).read_bytes())
    assert all(np.isfinite(v).all() for v in w.values())


def test_after_a_restart_a_resent_stale_update_stays_counted_once(
    fleet_factory: Any, digits4: FederatedData
) -> None:
    """Async rounds stay open after their version: the checkpoint keeps who was counted in
    them, so an update resent after an aggregator restart is a duplicate (receipted again),
    not a second vote; and the task tells devices which rounds still accept updates."""
    from tests.integration.fleet_helpers import update_for

    fleet = fleet_factory(
        digits4, mode="async", async_buffer=1, max_staleness=8, min_devices=1, round_timeout=60
    )
    fleet.start_aggregator()
    a, b = fleet.raw_device("dev-a"), fleet.raw_device("dev-b")
    try:
        t1 = a.wait_task(1)
        assert t1.accepts_from == 1
        weights = dict(fleet.aggregator.weights)
        u = update_for(weights, "dev-a", t1)
        a.send(u)
        t2 = a.wait_task(2)  # K = 1: dev-a's update made version 1, round 2 opened
        assert (t2.base_version, t2.accepts_from) == (1, 1)
        wait_until(lambda: len(a.receipts) == 1, 10, "dev-a's receipt")

        fleet.restart_aggregator()

        a.send(u)  # the same update again, as an agent resends after a reconnect
        wait_until(lambda: len(a.receipts) == 2, 10, "the duplicate's receipt")
        assert fleet.aggregator.metrics.rejected.get("duplicate") == 1
        assert fleet.aggregator.version == 1

        b.send(update_for(weights, "dev-b", t1))  # stale (round 1) but within the window
        # The version moves before its record is written (after the export): wait for both.
        wait_until(
            lambda: fleet.aggregator.version == 2 and len(fleet.records) == 2,
            10,
            "dev-b's stale update counted",
        )
        assert fleet.records[-1]["counted"] == {"dev-b@1": fleet.records[-1]["counted"]["dev-b@1"]}
    finally:
        a.close()
        b.close()


def test_a_restart_replays_the_buffer_even_after_a_checkpoint_listed_it_as_counted(
    fleet_factory: Any, digits4: FederatedData
) -> None:
    """A deadline extension checkpoints while a stale update waits in the buffer (journaled,
    in no version yet, but in the counted map of its older round): after a restart the
    journal replay must fold it again, not call it a duplicate of itself."""
    from tests.integration.fleet_helpers import update_for

    fleet = fleet_factory(
        digits4, mode="async", async_buffer=2, min_devices=2, target_devices=2, round_timeout=1
    )
    fleet.start_aggregator()
    devs = {n: fleet.raw_device(f"dev-{n}") for n in "abcd"}
    try:
        t1 = devs["a"].wait_task(1)
        w0 = dict(fleet.aggregator.weights)
        for n in "ab":
            devs[n].send(update_for(w0, f"dev-{n}", t1))
        t2 = devs["a"].wait_task(2)
        w1 = dict(fleet.aggregator.weights)
        devs["c"].send(update_for(w0, "dev-c", t1))  # stale: waits in the buffer for a 2nd
        wait_until(lambda: len(devs["c"].receipts) == 1, 10, "dev-c's receipt")
        wait_until(lambda: devs["a"].task.deadline > t2.deadline, 10, "an extension (a checkpoint)")

        fleet.restart_aggregator()
        devs["d"].send(update_for(w1, "dev-d", t2))
        wait_until(
            lambda: fleet.aggregator.version == 2 and len(fleet.records) == 2,
            10,
            "version 2 from c and d",
        )
        assert sorted(fleet.records[-1]["counted"]) == ["dev-c@1", "dev-d@2"]
    finally:
        for d in devs.values():
            d.close()
