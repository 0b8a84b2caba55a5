"""Fine-tuning the last layer over a real broker: devices send only the trainable tensors, and
the frozen ones stay bit-identical in every version the aggregator publishes and on devices,
with a server optimizer that keeps per-tensor state (FedAdam)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from aggregator.config import ModelConfig
from models.onnx_weights import read_initializers
from simulation.datasets import make_federated
from tests.integration.fleet_helpers import skip_reason_for_task, update_for, wait_until

pytestmark = pytest.mark.integration

LAST = ("fc3.weight", "fc3.bias")


def test_last_layer_fine_tuning_sends_only_it_and_freezes_the_rest(fleet_factory: Any) -> None:
    data = make_federated("digits", 3, "iid", seed=0)
    fleet = fleet_factory(
        data, rounds=3, target_devices=3, min_devices=3, round_timeout=30, codec="int8+zstd",
        strategy="fedadam", server_lr=0.05,
        model=ModelConfig(input_dim=64, num_classes=10, trainable=["fc3.*"]),
    )  # fmt: skip
    fleet.start_aggregator()
    agg = fleet.aggregator
    v0 = {k: v.copy() for k, v in agg.weights.items()}
    for i in range(3):
        fleet.add_agent(i)
    wait_until(agg.done.is_set, 120, "three versions")  # generous: shared, busy cores
    wait_until(
        lambda: all(a.model and a.model.version == 3 for a in fleet.agents.values()),
        10,
        "v3 on every device",
    )

    frozen = [k for k in v0 if k not in LAST]
    assert frozen
    # The aggregator: every published version keeps the frozen tensors bit for bit; the last
    # layer moved.
    for version in range(4):
        w = read_initializers(agg.registry.path(version).read_bytes())
        for k in frozen:
            assert w[k].tobytes() == v0[k].tobytes(), (version, k)
    final = read_initializers(agg.latest_model_path.read_bytes())
    assert all((final[k] != v0[k]).any() for k in LAST)
    # FedAdam's per-tensor moments hold nothing for frozen tensors.
    for key, value in agg.strategy.state_dict().items():
        if key.partition("/")[2] in frozen and isinstance(value, np.ndarray):
            assert not value.any(), key
    # Devices hold the same frozen tensors.
    for agent in fleet.agents.values():
        held = agent._global_weights(agent.model)
        for k in frozen:
            assert held[k].tobytes() == v0[k].tobytes(), (agent.device_id, k)
    # On the wire: the aggregator reads each update against the trainable tensors only (any
    # other set is refused bad_tensor: tests/unit/test_finetune.py), and counted them all; an
    # update is a fraction of what int8 of the whole model (about one byte a weight) would be.
    assert {r["version"] for r in fleet.records} == {1, 2, 3}
    assert all(len(r["counted"]) == 3 and not r["rejected"] for r in fleet.records)
    full_int8 = sum(v.size for v in v0.values())
    for r in fleet.records:
        assert r["uplink_bytes"] / 3 < full_int8 / 5, r["uplink_bytes"]


def test_a_device_skips_a_round_naming_tensors_its_model_lacks(fleet_factory: Any) -> None:
    _, reason = skip_reason_for_task(fleet_factory, trainable=("fc3.weight", "conv9.weight"))
    assert reason.startswith("cannot honour trainable:")
    assert "conv9.weight" in reason


def test_an_update_carrying_frozen_tensors_is_refused_with_one_reason(fleet_factory: Any) -> None:
    data = make_federated("digits", 1, "iid", seed=0)
    fleet = fleet_factory(
        data, rounds=1, target_devices=1, min_devices=1, round_timeout=30, codec="fp32",
        model=ModelConfig(input_dim=64, num_classes=10, trainable=["fc3.*"]),
    )  # fmt: skip
    fleet.start_aggregator()
    agg = fleet.aggregator
    raw = fleet.raw_device("dev-9")
    try:
        task = raw.wait_task(1)
        assert task.trainable == LAST
        raw.send(update_for(agg.weights, "dev-9", task))  # every tensor, frozen ones too
        wait_until(lambda: agg.round is not None and agg.round.rejected, 10, "the refusal")
        fleet.add_agent(0)
        wait_until(agg.done.is_set, 30, "version 1")
    finally:
        raw.close()

    (record,) = fleet.records
    assert record["rejected"] == {"bad_tensor": 1}
    assert list(record["counted"]) == ["dev-0"]
