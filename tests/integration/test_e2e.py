"""The end-to-end path over a real Mosquitto: aggregator + edge agents + hand-driven devices."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.service import Aggregator
from edge_agent.inference import OnnxPredictor
from fedge.codecs import parse_codec
from fedge.tensors import dense_record, encode_records
from models.onnx_weights import read_initializers
from simulation.broker import MosquittoBroker
from simulation.datasets import FederatedData, make_federated
from simulation.fleet import SimConfig, simulate
from tests.integration.fleet_helpers import update_for, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def digits3() -> FederatedData:
    return make_federated("digits", 3, "iid", seed=0)


def test_simulation_accuracy_rises_and_summary_is_complete(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    cfg = SimConfig(
        out=tmp_path / "run", devices=3, rounds=3, partition="iid", epochs=1, broker=broker.url
    )

    summary = simulate(cfg, say=lambda _s: None)

    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["version"] for r in records] == [1, 2, 3]
    assert all(r["devices"] == 3 for r in records)
    assert records[-1]["accuracy"] > records[0]["accuracy"]
    for key in (
        "rounds",
        "final_accuracy",
        "uplink_bytes",
        "downlink_bytes",
        "wall_seconds",
        "model_onnx",
    ):
        assert key in summary
    assert summary["rounds"] == 3
    assert summary["uplink_bytes"] == sum(r["uplink_bytes"] for r in records) > 0
    # Each device received at least the 4 published versions and 3 tasks.
    assert summary["downlink_bytes"] > 3 * 4 * records[-1]["model_bytes"]
    # The published model is usable for inference as is, and is the evaluated one.
    x, y = make_federated("digits", 3, "iid", seed=0).test
    pred = OnnxPredictor.from_path(Path(summary["model_onnx"])).predict(x)
    assert float((pred == y).mean()) == pytest.approx(summary["final_accuracy"])


def test_late_device_gets_retained_model_and_joins_next_round(
    fleet_factory: Any, digits3: FederatedData
) -> None:
    fleet = fleet_factory(digits3, rounds=3, target_devices=3, min_devices=2, round_timeout=3.0)
    fleet.start_aggregator()
    fleet.add_agent(0)
    fleet.add_agent(1)
    wait_until(lambda: len(fleet.records) >= 1, 30, "version 1 from two devices")
    assert fleet.records[0]["devices"] == 2

    late = fleet.add_agent(2)

    wait_until(lambda: late.model is not None and late.model.version >= 1, 10, "retained model")
    wait_until(lambda: fleet.aggregator.done.is_set(), 40, "three versions")
    assert late.counters.updates_sent >= 1
    assert any(r["devices"] == 3 for r in fleet.records[1:])


def test_the_registry_keeps_only_the_newest_versions_when_asked(
    fleet_factory: Any, digits3: FederatedData
) -> None:
    fleet = fleet_factory(
        digits3, rounds=4, target_devices=3, min_devices=3, round_timeout=30, keep_versions=2
    )
    fleet.start_aggregator()
    for i in range(3):
        fleet.add_agent(i)
    wait_until(lambda: fleet.aggregator.done.is_set(), 60, "four versions")
    assert fleet.aggregator.registry.versions() == [3, 4]
    assert fleet.aggregator.latest_model_path.exists()


def _zero_update(agg: Aggregator, device: str, task: Any, **over: Any) -> bytes:
    return update_for(agg.weights, device, task, **over)


def test_duplicates_and_bad_payloads_are_rejected_while_round_completes(
    fleet_factory: Any, digits3: FederatedData, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="aggregator.service")
    fleet = fleet_factory(digits3, rounds=1, target_devices=2, min_devices=2, round_timeout=30)
    fleet.start_aggregator()
    good_a, good_b, bad = (fleet.raw_device(n) for n in ("dev-a", "dev-b", "dev-bad"))
    task = good_a.wait_task(1)
    agg = fleet.aggregator
    wrong_shape = {k: np.zeros((3, 3), np.float32) for k in agg.weights}
    nan = {k: np.full_like(v, np.nan) for k, v in agg.weights.items()}
    try:
        dup = _zero_update(agg, "dev-a", task)
        good_a.send(dup)
        good_a.send(dup)
        bad.send(b"\xc1 not msgpack")
        bad.send(
            _zero_update(
                agg,
                "dev-bad",
                task,
                delta=encode_records([dense_record(k, v, "<f4") for k, v in wrong_shape.items()]),
            )
        )
        bad.send(
            _zero_update(
                agg,
                "dev-bad",
                task,
                delta=encode_records([dense_record(k, v, "<f4") for k, v in nan.items()]),
            )
        )
        wait_until(lambda: sum(agg.metrics.rejected.values()) >= 4, 10, "four rejections")
        assert agg.version == 0  # nothing bad closed the round

        good_b.send(_zero_update(agg, "dev-b", task))

        wait_until(agg.done.is_set, 10, "round completes")
    finally:
        for d in (good_a, good_b, bad):
            d.close()
    assert fleet.records[0]["devices"] == 2
    assert dict(agg.metrics.rejected) == {
        "duplicate": 1,
        "bad_msgpack": 1,
        "bad_tensor": 1,
        "non_finite": 1,
    }
    assert fleet.records[0]["rejected"] == dict(agg.metrics.rejected)
    logged = caplog.text
    for reason in ("duplicate", "bad_msgpack", "bad_tensor", "non_finite"):
        assert f"rejected update: {reason}" in logged
    # Zero deltas from both counted devices leave the published model unchanged.
    v0 = read_initializers(agg.registry.path(0).read_bytes())
    v1 = read_initializers(agg.registry.path(1).read_bytes())
    for name in v0:
        np.testing.assert_array_equal(v1[name], v0[name])


def test_overflowing_updates_are_refused_and_the_model_is_kept(
    fleet_factory: Any, digits3: FederatedData
) -> None:
    # Finite float32 deltas whose weighted sum overflows: never folded, never published.
    fleet = fleet_factory(digits3, rounds=1, target_devices=2, min_devices=2, round_timeout=4)
    fleet.start_aggregator()
    agg = fleet.aggregator
    devs = [fleet.raw_device(n) for n in ("dev-a", "dev-b")]
    task = devs[0].wait_task(1)
    huge = {k: np.full_like(v, 3.0e38) for k, v in agg.weights.items()}
    blob = parse_codec(task.codec).encode(huge)
    v0 = read_initializers(agg.registry.path(0).read_bytes())
    try:
        for d in devs:
            d.send(_zero_update(agg, d.device_id, task, delta=blob))

        wait_until(lambda: agg.failed_rounds >= 1, 15, "round 1 to fail at its deadline")
    finally:
        for d in devs:
            d.close()
    assert agg.metrics.rejected["aggregation"] == 2
    assert agg.version == 0
    for name, w in v0.items():
        np.testing.assert_array_equal(agg.weights[name], w)
    failed = [json.loads(x) for x in agg.metrics.path.read_text().splitlines()]
    assert "quorum not met" in failed[0]["failed"]


def test_models_larger_than_the_chunk_size_are_chunked_and_reassembled(
    fleet_factory: Any, digits3: FederatedData
) -> None:
    # ~42 kB announcements in 8 kB chunks: devices must reassemble to train at all.
    fleet = fleet_factory(
        digits3, rounds=2, target_devices=3, min_devices=3, round_timeout=30, model_chunk_bytes=8192
    )
    fleet.start_aggregator()
    agents = [fleet.add_agent(i) for i in range(3)]

    wait_until(fleet.aggregator.done.is_set, 40, "two versions over chunked models")

    final = fleet.aggregator.registry.path(2).read_bytes()
    wait_until(
        lambda: all(a.model is not None and a.model.version == 2 for a in agents),
        10,
        "devices to assemble v2",
    )
    assert all(a.model is not None and a.model.onnx == final for a in agents)
    assert fleet.aggregator.publisher._chunks_published >= 5
    assert all(r["devices"] == 3 for r in fleet.records)
