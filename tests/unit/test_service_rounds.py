"""The service's round orchestration over the in-memory broker: no Mosquitto, no threads.

Each test drives a real ``Aggregator`` (strategy, journal, checkpoint, ONNX export) on a
``ManualLoop`` whose clock moves only when the test says, so a deadline fires exactly when
asked. The wire contract over a real broker is tested in tests/integration.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.config import AggregatorConfig, ModelConfig
from aggregator.metrics import MetricsSink
from aggregator.service import Aggregator
from fedge.codecs import parse_codec
from fedge.envelopes import GlobalModel, ModelUpdate, Receipt, RoundTask
from fedge.topics import Topics
from fedge.transport.base import SessionRequest
from fedge.transport.memory import ManualLoop, MemoryBroker, MemorySession

FLEET = "unit"
TOPICS = Topics(FLEET)


class Device:
    """A hand-driven device on the memory broker: keeps what it receives, sends updates."""

    def __init__(self, broker: MemoryBroker, name: str) -> None:
        self.name = name
        self.receipts: list[Receipt] = []
        self.session: MemorySession = broker.session(
            SessionRequest(name, [TOPICS.receipt(name)], on_message=self._on_message)
        )
        self.session.start()

    def _on_message(self, topic: str, payload: bytes) -> None:
        self.receipts.append(Receipt.from_bytes(payload))

    def send(self, task: RoundTask, delta: dict[str, np.ndarray], num_samples: int) -> str:
        uid = uuid.uuid4().hex
        upd = ModelUpdate(
            device=self.name,
            round=task.round,
            base_version=task.base_version,
            update_id=uid,
            nonce=task.nonce,
            num_samples=num_samples,
            codec=task.codec,
            delta=parse_codec(task.codec).encode(delta),
        )
        self.session.publish(TOPICS.update(self.name), upd.to_bytes())
        return uid


def current_task(broker: MemoryBroker) -> RoundTask:
    return RoundTask.from_bytes(broker.retained[TOPICS.task])


def random_delta(weights: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(v.shape).astype(np.float32) * 0.01 for k, v in weights.items()}


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Any]:
    broker, loop = MemoryBroker(), ManualLoop()
    records: list[dict[str, Any]] = []
    started: list[Aggregator] = []

    def start(**cfg: Any) -> Aggregator:
        config = AggregatorConfig(
            broker="mqtt://127.0.0.1:1",  # never dialled: the session comes from the factory
            fleet=FLEET,
            state_dir=tmp_path / "aggregator",
            model=ModelConfig(name="logreg", input_dim=8, num_classes=3),
            **cfg,
        )
        agg = Aggregator(config, loop, session_factory=broker.session, on_round=records.append)
        agg.start()
        loop.run()
        started.append(agg)
        return agg

    yield broker, loop, records, start
    for agg in started:
        agg.stop()  # closes the round journal
    loop.run()


def test_a_round_folds_its_updates_and_publishes_the_next_version(rig: Any) -> None:
    broker, loop, records, start = rig
    agg = start(target_devices=2, min_devices=2, rounds=2, round_timeout=30)
    a, b = Device(broker, "dev-a"), Device(broker, "dev-b")
    task = current_task(broker)
    w0 = {k: v.copy() for k, v in agg.weights.items()}
    da, db = random_delta(w0, 1), random_delta(w0, 2)

    ua = a.send(task, da, num_samples=10)
    assert agg.version == 0  # one of two: the round stays open
    ub = b.send(task, db, num_samples=30)

    # FedAvg with server_lr 1: w0 + sum n_i d_i / sum n_i, computed here independently.
    for k, w in w0.items():
        np.testing.assert_allclose(agg.weights[k], w + (10 * da[k] + 30 * db[k]) / 40, rtol=1e-6)
    assert agg.version == 1
    assert GlobalModel.from_bytes(broker.retained[TOPICS.model]).version == 1
    assert [r.update_id for r in a.receipts + b.receipts] == [ua, ub]
    assert records[0]["counted"] == {"dev-a": ua, "dev-b": ub}
    assert (records[0]["round"], records[0]["devices"], records[0]["samples"]) == (1, 2, 40)
    nxt = current_task(broker)
    assert (nxt.round, nxt.base_version) == (2, 1)
    # The new round's deadline (round 1's was cancelled) and the rollout request poll.
    assert loop.timers == 2
    meta = agg.registry.meta(1)  # the registry says what made the version
    assert (meta["round"], meta["devices"]) == (1, ["dev-a", "dev-b"])
    onnx, _ = agg.registry.load(1)
    assert (meta["bytes"], meta["sha256"]) == (
        len(onnx),
        GlobalModel.from_bytes(broker.retained[TOPICS.model]).sha256,
    )


def test_a_round_short_of_quorum_fails_at_its_deadline(rig: Any) -> None:
    broker, loop, records, start = rig
    agg = start(target_devices=3, min_devices=2, round_timeout=30)
    a = Device(broker, "dev-a")
    task = current_task(broker)
    a.send(task, random_delta(agg.weights, 3), num_samples=10)

    loop.advance(29)
    assert agg.failed_rounds == 0
    loop.advance(2)

    assert (agg.failed_rounds, agg.version, records) == (1, 0, [])
    lines = [json.loads(x) for x in agg.metrics.path.read_text().splitlines()]
    assert lines[-1]["round"] == 1
    assert lines[-1]["failed"] == "quorum not met: 1 of 2 by deadline"
    nxt = current_task(broker)
    assert (nxt.round, nxt.base_version) == (2, 0)  # a new round on the same version
    assert agg.round is not None
    assert agg.round.counted == {}


def test_an_async_round_short_of_quorum_is_extended_not_failed(rig: Any) -> None:
    broker, loop, _records, start = rig
    agg = start(mode="async", async_buffer=2, min_devices=2, target_devices=2, round_timeout=30)
    a = Device(broker, "dev-a")
    task = current_task(broker)
    a.send(task, random_delta(agg.weights, 4), num_samples=10)

    loop.advance(31)

    again = current_task(broker)
    assert agg.failed_rounds == 0
    assert (again.round, again.nonce) == (task.round, task.nonce)
    assert again.deadline > task.deadline
    assert agg.round is not None
    assert list(agg.round.counted) == ["dev-a"]


def test_an_update_for_no_open_round_is_refused_and_counted(rig: Any) -> None:
    broker, _loop, _records, start = rig
    agg = start(target_devices=1, min_devices=1, rounds=1)
    a = Device(broker, "dev-a")
    task = current_task(broker)
    a.send(task, random_delta(agg.weights, 5), num_samples=10)
    assert agg.done.is_set()

    a.send(task, random_delta(agg.weights, 6), num_samples=10)

    assert agg.metrics.rejected == {"no_round": 1}
    assert agg.metrics.accepted == 1


def test_a_sharded_round_closes_on_the_merge_of_a_workers_partial_sum(
    rig: Any, tmp_path: Path
) -> None:
    """The service as the reducer: the worker takes the updates through the shared intake
    (journal, receipt, clipped sum) and the service closes on the sealed merge."""
    from aggregator.sharded.worker import ShardWorker, WorkerConfig

    broker, loop, records, start = rig
    agg = start(shard_workers=("w0",), target_devices=2, min_devices=2, shard_poll=0.5)
    assert agg.round is None  # no round before the worker announced itself
    worker = ShardWorker(
        WorkerConfig("mqtt://127.0.0.1:1", FLEET, "w0", tmp_path / "w0"),
        loop,
        session_factory=broker.session,
    )
    worker.start()
    task = current_task(broker)
    a, b = Device(broker, "dev-a"), Device(broker, "dev-b")
    w0 = {k: v.copy() for k, v in agg.weights.items()}
    da, db = random_delta(w0, 7), random_delta(w0, 8)

    ua, ub = a.send(task, da, num_samples=20), b.send(task, db, num_samples=20)
    assert worker.folded == 2
    assert [r.update_id for r in a.receipts + b.receipts] == [ua, ub]
    loop.advance(0.5)  # poll -> partial -> merge meets the target -> seal -> final -> close

    assert agg.version == 1
    assert records[0]["counted"] == {"dev-a": ua, "dev-b": ub}
    for k, w in w0.items():
        np.testing.assert_allclose(agg.weights[k], w + (da[k] + db[k]) / 2, rtol=1e-6)
    worker.stop()


class Recorder(MetricsSink):
    """A second metrics sink: records every report."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def reject(self, reason: str, count: int = 1, *, device: str | None = None) -> None:
        self.calls.append(("reject", (reason, count, device)))

    def event(self, name: str) -> None:
        self.calls.append(("event", name))

    def accept(
        self,
        count: int = 1,
        *,
        device: str | None = None,
        staleness: int = 0,
        base_version: int | None = None,
    ) -> None:
        self.calls.append(("accept", (count, device, staleness, base_version)))

    def received(self, device: str, packet_bytes: int) -> None:
        self.calls.append(("received", device))

    def timing(self, name: str, seconds: float) -> None:
        self.calls.append(("timing", name))

    def write(self, record: Any) -> None:
        self.calls.append(("write", record["round"]))


def test_an_extra_metrics_sink_sees_what_the_jsonl_log_counts(tmp_path: Path) -> None:
    broker, loop, rec = MemoryBroker(), ManualLoop(), Recorder()
    config = AggregatorConfig(
        broker="mqtt://127.0.0.1:1",
        fleet=FLEET,
        state_dir=tmp_path / "aggregator",
        model=ModelConfig(name="logreg", input_dim=8, num_classes=3),
        target_devices=1,
        min_devices=1,
        rounds=1,
        max_num_samples=5,
    )
    agg = Aggregator(config, loop, session_factory=broker.session, metrics_sinks=[rec])
    agg.start()
    a = Device(broker, "dev-a")
    task = current_task(broker)
    a.session.publish(TOPICS.update("dev-a"), b"not msgpack")
    a.send(task, random_delta(agg.weights, 9), num_samples=10)
    agg.stop()
    loop.run()

    assert [c for c in rec.calls if c[0] != "timing"] == [
        ("received", "dev-a"),
        ("reject", ("bad_msgpack", 1, "dev-a")),
        ("received", "dev-a"),
        ("event", "clamped_samples"),
        ("accept", (1, "dev-a", 0, 0)),
        ("write", 1),
    ]
    assert {c[1] for c in rec.calls if c[0] == "timing"} == {"journal_append", "checkpoint"}
    assert (dict(agg.metrics.rejected), dict(agg.metrics.events)) == (
        {"bad_msgpack": 1},
        {"clamped_samples": 1},
    )
    assert agg.metrics.accepted == 1


def test_sample_cap_is_relative_to_the_lower_median() -> None:
    from aggregator.weighting import SampleCap, lower_median

    assert lower_median([]) == 0
    assert lower_median([10, 2**62]) == 10  # one liar of two cannot raise it
    assert lower_median([5, 1, 9]) == 5
    cap = SampleCap(max_num_samples=100_000, ratio=4.0)
    assert cap.cap(0) == 100_000  # no reference yet: the absolute clamp only
    assert cap.cap(140) == 560
    assert cap.cap(10**9) == 100_000
    assert SampleCap(100_000, 0.0).cap(140) == 100_000  # off
    assert SampleCap(100_000, 0.5).cap(1) == 1
