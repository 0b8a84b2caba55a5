"""Federated pruning over a real broker: pruned weights stay zero through local training,
aggregation and restarts of the aggregator and of a device, mid-schedule."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from aggregator.prune_config import PruningConfig
from fedge.masks import Mask
from models.onnx_weights import read_initializers
from simulation.datasets import make_federated
from tests.integration.fleet_helpers import skip_reason_for_task, wait_until

pytestmark = pytest.mark.integration


def _assert_pruned_are_zero(weights: dict[str, np.ndarray], keep: dict[str, np.ndarray]) -> None:
    assert keep
    for name, flags in keep.items():
        assert (weights[name][~flags] == 0).all(), name
        assert (weights[name][flags] != 0).any(), name


def test_mask_holds_through_aggregation_and_restarts(fleet_factory: Any) -> None:
    data = make_federated("digits", 3, "iid", seed=0)
    prune = PruningConfig(kind="unstructured", target=0.75, start_round=1, end_round=5)
    fleet = fleet_factory(
        data, rounds=3, target_devices=3, min_devices=3, round_timeout=30, codec="fp32",
        strategy="fedavgm", pruning=prune,
    )  # fmt: skip
    fleet.start_aggregator()
    for i in range(3):
        fleet.add_agent(i)
    wait_until(fleet.aggregator.done.is_set, 60, "three versions")
    agg = fleet.aggregator
    mid = {k: v.copy() for k, v in agg.pruner.keep.items()}
    level = agg.pruner.level
    assert 0 < level < prune.target  # mid-schedule
    _assert_pruned_are_zero(read_initializers(agg.latest_model_path.read_bytes()), mid)
    velocity = {k.partition("/")[2]: v for k, v in agg.strategy.state_dict().items() if "/" in k}
    for name, flags in mid.items():
        assert (velocity[name][~flags] == 0).all()
    wait_until(
        lambda: all(a.model and a.model.version == 3 for a in fleet.agents.values()), 10, "v3"
    )
    held = fleet.agents["dev-0"]._global_weights(fleet.agents["dev-0"].model)
    _assert_pruned_are_zero(held, mid)

    # A device restarts (same state directory), then the aggregator, with two more versions.
    old = fleet.agents["dev-0"]
    old.stop()
    wait_until(lambda: not old.session.connected, 10, "dev-0 stop")
    fleet.config = fleet.config.model_copy(update={"rounds": 5})
    again = fleet.restart_aggregator()
    assert again.pruner.level == level
    assert again.pruner.mask == agg.pruner.mask
    fleet.add_agent(0)
    wait_until(again.done.is_set, 60, "five versions")

    final = again.pruner.keep
    assert again.pruner.level == prune.target
    for name, flags in mid.items():
        assert not (final[name] & ~flags).any()  # the mask only grew
    _assert_pruned_are_zero(read_initializers(again.latest_model_path.read_bytes()), final)
    last = fleet.records[-1]
    assert last["version"] == 5
    assert set(last["counted"]) == {"dev-0", "dev-1", "dev-2"}  # the restarted device too
    assert not last["rejected"]
    assert last["sparsity"] == pytest.approx(
        sum(int((~k).sum()) for k in final.values())
        / sum(v.size for v in read_initializers(again.latest_model_path.read_bytes()).values())
    )


def test_a_device_skips_a_round_whose_mask_it_cannot_honour(fleet_factory: Any) -> None:
    # A task (unsigned fleet) whose mask names a tensor the mlp does not have.
    _, reason = skip_reason_for_task(fleet_factory, mask=Mask(bits={"conv9.weight": b"\x80"}))
    assert reason.startswith("cannot honour mask:")
