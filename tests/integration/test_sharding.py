"""Sharded aggregation over a real Mosquitto: 1, 2 and 4 shard workers on one shared
subscription give the same FedAvg model as numpy computes from the same updates.

Twelve hand-driven devices (fixed seeds) publish one update each; the reducer asks every
worker for its partial sum until all twelve are counted. Each run has a fleet of its own, so
the persistent sessions of earlier runs' workers share nothing with it. Every wait is bounded.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from aggregator.sharded.reducer import Merged
from aggregator.sharded.service import ReducerSession
from aggregator.sharded.worker import ShardWorker, WorkerConfig
from fedge.codecs import parse_codec
from fedge.envelopes import GlobalModel, ModelArch, ModelUpdate, RoundTask, TrainHyper
from fedge.limits import DEFAULT_LIMITS
from fedge.topics import Topics
from fedge.transport.mux import Mux
from fedge.transport.session import Session, SessionOptions
from simulation.broker import MosquittoBroker

pytestmark = pytest.mark.integration

WAIT = 30.0  # generous for a loaded 2-core box; a passing run takes about a second
DEVICES = [f"dev-{i:02d}" for i in range(12)]
SHAPES = {"fc1.weight": (16, 8), "fc1.bias": (16,), "fc2.weight": (4, 16), "fc2.bias": (4,)}
SERVER_LR = 0.7
# Each worker's sum travels as fp32: per tensor element the merged mean is off by at most
# 2**-24 * max|delta| (~3e-9 here) from float64, far below ATOL, and the fp32 model's own
# rounding is within RTOL.
RTOL, ATOL = 1e-6, 1e-8


def _model_onnx(weights: dict[str, np.ndarray]) -> bytes:
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["input", "fc1.weight", "fc1.bias"], ["h"], transB=1),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Gemm", ["r", "fc2.weight", "fc2.bias"], ["logits"], transB=1),
        ],
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


@dataclass(frozen=True)
class Case:
    weights: dict[str, np.ndarray]
    model: GlobalModel
    task: RoundTask
    payloads: dict[str, bytes]  # device -> ModelUpdate bytes
    expected: dict[str, np.ndarray]  # numpy FedAvg, float64
    total_weight: int


def make_case(codec_name: str) -> Case:
    rng = np.random.default_rng(7)
    weights = {k: rng.normal(0, 0.3, s).astype(np.float32) for k, s in SHAPES.items()}
    onnx_bytes = _model_onnx(weights)
    model = GlobalModel(
        version=3,
        arch=ModelArch("mlp", 8, 4),
        onnx=onnx_bytes,
        sha256=hashlib.sha256(onnx_bytes).hexdigest(),
        created=1.0,
    )
    task = RoundTask(
        round=5,
        base_version=3,
        deadline=time.time() + 3600,
        codec=codec_name,
        hyper=TrainHyper(),
        nonce=bytes(range(16)),
    )
    codec = parse_codec(codec_name)
    payloads, deltas, samples = {}, [], []
    for i, device in enumerate(DEVICES):
        drng = np.random.default_rng(100 + i)
        delta = {k: drng.normal(0, 0.01, s).astype(np.float32) for k, s in SHAPES.items()}
        blob = codec.encode(delta, rng=np.random.default_rng(200 + i))
        n = 10 + 7 * i
        upd = ModelUpdate(device, 5, 3, f"{device}-u", task.nonce, n, codec_name, blob)
        payloads[device] = upd.to_bytes()
        # A lossy codec's decoded delta is what any aggregator receives; fp32 is exact.
        deltas.append(codec.decode(blob, SHAPES, DEFAULT_LIMITS) if not codec.lossless else delta)
        samples.append(n)
    expected = {
        k: weights[k].astype(np.float64)
        + SERVER_LR
        * np.average(np.stack([d[k].astype(np.float64) for d in deltas]), axis=0, weights=samples)
        for k in SHAPES
    }
    return Case(weights, model, task, payloads, expected, sum(samples))


def _publish(mux: Mux, session: Session, topic: str, payload: bytes) -> None:
    done = threading.Event()
    ok: list[bool] = []
    mux.call_soon(
        lambda: session.publish(
            topic, payload, on_done=lambda good, _r: (ok.append(good), done.set())
        )
    )
    assert done.wait(WAIT), f"no PUBACK for {topic} within {WAIT}s"
    assert ok == [True], f"publish on {topic} refused"


@dataclass
class Run:
    merged: Merged
    new: dict[str, np.ndarray]
    overlaps_resolved: int


def run_sharded(
    broker: MosquittoBroker,
    state: Path,
    case: Case,
    workers: int,
    *,
    sends: Sequence[str] = DEVICES,
    ask: bool = True,
    restart_after: int | None = None,
) -> Run:
    """Start the reducer and ``workers`` workers on a fleet of their own, publish the model and
    the task, let each device of ``sends`` publish its update in order, then collect.

    ``restart_after=i``: stop the first worker after the i-th publish and start a new one
    with the same name and state directory once all are published."""
    fleet = f"shard{uuid.uuid4().hex[:8]}"
    topics = Topics(fleet)
    names = [f"aggregator-{j}" for j in range(workers)]
    mux = Mux(f"shard-test-{workers}").start()
    reducer = ReducerSession(mux, broker.url, fleet, names).start(WAIT)
    shard_workers: list[ShardWorker] = []
    devices: dict[str, Session] = {}
    try:
        reducer.publish(topics.model, case.model.to_bytes(), retain=True, timeout=WAIT)
        reducer.publish(topics.task, case.task.to_bytes(), retain=True, timeout=WAIT)
        for name in names:
            w = ShardWorker(WorkerConfig(broker.url, fleet, name, state / fleet / name), mux)
            w.start()
            shard_workers.append(w)
        for w in shard_workers:
            assert w.ready.wait(WAIT), f"{w.name} never held the model and the task"
        for device in DEVICES:
            devices[device] = Session(
                mux,
                reducer.session.url,
                SessionOptions(device, device, session_expiry=0),
                [],
                _no_message,
            )
            devices[device].start()
        for i, device in enumerate(sends):  # one at a time: the broker sees them in order
            if i == restart_after:
                stopped = shard_workers[0]
                stopped.stop()
                assert _wait(lambda w=stopped: not w.session.connected), "worker did not stop"
            _publish(mux, devices[device], topics.update(device), case.payloads[device])
        if restart_after is not None:
            again = ShardWorker(shard_workers[0].config, mux)
            shard_workers[0] = again
            again.start()
            assert again.ready.wait(WAIT), "the restarted worker never opened the round"
        if not ask:
            # Re-announce the round with a deadline in 0.3 s: workers move their deadline and
            # send their partials unasked when it passes.
            soon = replace(case.task, deadline=time.time() + 0.3)
            reducer.publish(topics.task, soon.to_bytes(), retain=True, timeout=WAIT)
        merged = reducer.collect(
            case.task.round,
            case.task.base_version,
            SHAPES,
            min_count=len(DEVICES),
            timeout=WAIT,
            ask=ask,
        )
        return Run(
            merged, merged.fedavg(case.weights, SERVER_LR), reducer.reducer.overlaps_resolved
        )
    finally:
        for w in shard_workers:
            w.stop()
        for s in devices.values():
            mux.call_soon(s.close)
        reducer.close()
        time.sleep(0.2)  # let the DISCONNECTs out before the loop stops
        mux.stop()


def _no_message(_topic: str, _payload: bytes) -> None:
    return None


def _wait(condition: Callable[[], bool]) -> bool:
    end = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def _assert_counted_once(case: Case, merged: Merged) -> None:
    assert merged.counted == {d: f"{d}-u" for d in DEVICES}
    assert sum(merged.per_worker.values()) == len(DEVICES)
    assert merged.total_weight == case.total_weight


@pytest.mark.parametrize("codec", ["fp32", "int8+zstd"])
def test_two_and_four_workers_give_the_single_workers_model(
    sharded_broker: MosquittoBroker, tmp_path: Path, codec: str
) -> None:
    # Prepare
    case = make_case(codec)

    # Execute
    runs = {k: run_sharded(sharded_broker, tmp_path, case, k) for k in (1, 2, 4)}

    # Assert
    for k, run in runs.items():
        _assert_counted_once(case, run.merged)
        assert sorted(run.merged.per_worker) == [f"aggregator-{j}" for j in range(k)]
        assert min(run.merged.per_worker.values()) >= 1, run.merged.per_worker  # shares spread
        for name, value in run.new.items():
            assert value.dtype == np.float32
            np.testing.assert_allclose(value, runs[1].new[name], rtol=RTOL, atol=ATOL)
            np.testing.assert_allclose(value, case.expected[name], rtol=RTOL, atol=ATOL)
    # The step is not negligible next to the tolerance: the test could tell a lost update.
    moved = max(np.abs(runs[1].new[k] - case.weights[k]).max() for k in SHAPES)
    assert moved > 1e3 * ATOL


def test_an_update_delivered_to_two_workers_counts_once(
    sharded_broker: MosquittoBroker, tmp_path: Path
) -> None:
    # Prepare: every device sends its update twice; the second pass is rotated by one, so
    # with Mosquitto's round-robin dispatch each copy lands on the other worker.
    case = make_case("fp32")
    sends = DEVICES + DEVICES[1:] + DEVICES[:1]

    # Execute
    run = run_sharded(sharded_broker, tmp_path, case, 2, sends=sends)

    # Assert
    assert run.overlaps_resolved >= 1
    _assert_counted_once(case, run.merged)
    assert run.merged.rejected.get("duplicate", 0) + len(DEVICES) + run.overlaps_resolved == len(
        sends
    )
    for name, value in run.new.items():
        np.testing.assert_allclose(value, case.expected[name], rtol=RTOL, atol=ATOL)


def test_workers_send_their_partials_at_the_deadline(
    sharded_broker: MosquittoBroker, tmp_path: Path
) -> None:
    # Prepare
    case = make_case("fp32")

    # Execute: the reducer never asks
    run = run_sharded(sharded_broker, tmp_path, case, 2, ask=False)

    # Assert
    _assert_counted_once(case, run.merged)
    for name, value in run.new.items():
        np.testing.assert_allclose(value, case.expected[name], rtol=RTOL, atol=ATOL)


def test_a_restarted_worker_replays_its_journal_and_gets_its_queued_share(
    sharded_broker: MosquittoBroker, tmp_path: Path
) -> None:
    # Prepare
    case = make_case("fp32")

    # Execute: aggregator-0 goes down after 6 updates; its share of the other 6 waits in its
    # persistent session, what it had folded is in its journal.
    run = run_sharded(sharded_broker, tmp_path, case, 2, restart_after=6)

    # Assert
    _assert_counted_once(case, run.merged)
    assert run.merged.per_worker["aggregator-0"] == 6
    for name, value in run.new.items():
        np.testing.assert_allclose(value, case.expected[name], rtol=RTOL, atol=ATOL)


def test_a_sealed_round_refuses_later_updates_without_a_receipt(
    sharded_broker: MosquittoBroker, tmp_path: Path
) -> None:
    """After the reducer's final request a worker answers, then refuses the round's later
    updates (``round_closed``) without confirming them: every update a device holds a
    receipt for is in the sums the round closes on."""
    from fedge.transport.mqtt import BrokerURL
    from tests.integration.fleet_helpers import RawDevice, wait_until

    # Prepare: one worker holds the round; dev-00's update is in and confirmed.
    case = make_case("fp32")
    fleet = f"shard{uuid.uuid4().hex[:8]}"
    topics = Topics(fleet)
    mux = Mux("seal-test").start()
    reducer = ReducerSession(mux, sharded_broker.url, fleet, ["aggregator-0"]).start(WAIT)
    url = BrokerURL.parse(sharded_broker.url)
    worker = ShardWorker(WorkerConfig(sharded_broker.url, fleet, "aggregator-0", tmp_path), mux)
    first, late = (RawDevice(url.host, url.port, d, topics.prefix) for d in DEVICES[:2])
    merges: list[Merged] = []
    try:
        reducer.publish(topics.model, case.model.to_bytes(), retain=True, timeout=WAIT)
        reducer.publish(topics.task, case.task.to_bytes(), retain=True, timeout=WAIT)
        worker.start()
        assert worker.ready.wait(WAIT)
        first.send(case.payloads[DEVICES[0]])
        wait_until(lambda: len(first.receipts) == 1, WAIT, "dev-00's receipt")

        # Execute: seal, then a late update.
        mux.call_soon(reducer.reducer.begin, 5, 3, SHAPES, merges.append)
        mux.call_soon(lambda: reducer.reducer.request(final=True))
        wait_until(lambda: bool(merges) and merges[-1].final, WAIT, "the final merge")
        late.send(case.payloads[DEVICES[1]])
        wait_until(
            lambda: worker.round is not None and worker.round.rejected.get("round_closed") == 1,
            WAIT,
            "the late update refused",
        )

        # Assert
        time.sleep(0.3)  # a receipt would have come with the refusal
        assert late.receipts == []
        assert merges[-1].counted == {DEVICES[0]: f"{DEVICES[0]}-u"}
        assert DEVICES[1] not in worker.round.counted
    finally:
        first.close()
        late.close()
        worker.stop()
        reducer.close()
        time.sleep(0.2)
        mux.stop()


def test_an_update_held_before_its_task_stays_with_the_broker_until_journaled(
    sharded_broker: MosquittoBroker, tmp_path: Path
) -> None:
    """A worker that has the model but not yet the task holds an update without acking it:
    stopped in that state, it loses nothing; its successor gets the update again and counts
    it."""
    from fedge.transport.mqtt import BrokerURL
    from tests.integration.fleet_helpers import RawDevice, wait_until

    # Prepare: model, no task; dev-00's update reaches the worker and is held.
    case = make_case("fp32")
    fleet = f"shard{uuid.uuid4().hex[:8]}"
    topics = Topics(fleet)
    mux = Mux("hold-test").start()
    reducer = ReducerSession(mux, sharded_broker.url, fleet, ["aggregator-0"]).start(WAIT)
    url = BrokerURL.parse(sharded_broker.url)
    cfg = WorkerConfig(sharded_broker.url, fleet, "aggregator-0", tmp_path)
    worker = ShardWorker(cfg, mux)
    device = RawDevice(url.host, url.port, DEVICES[0], topics.prefix)
    again: ShardWorker | None = None
    try:
        reducer.publish(topics.model, case.model.to_bytes(), retain=True, timeout=WAIT)
        worker.start()
        wait_until(lambda: worker.model_version == 3, WAIT, "the model at the worker")
        device.send(case.payloads[DEVICES[0]])
        wait_until(lambda: len(worker._pending) == 1, WAIT, "the update held")

        # Execute: stop the worker, publish the task, start its successor.
        worker.stop()
        wait_until(lambda: not worker.session.connected, WAIT, "the worker stopped")
        reducer.publish(topics.task, case.task.to_bytes(), retain=True, timeout=WAIT)
        again = ShardWorker(cfg, mux)
        again.start()

        # Assert: redelivered, journaled, confirmed, counted.
        wait_until(
            lambda: again.round is not None and DEVICES[0] in again.round.counted,
            WAIT,
            "the held update counted by the successor",
        )
        wait_until(lambda: len(device.receipts) == 1, WAIT, "its receipt")
    finally:
        device.close()
        if again is not None:
            again.stop()
        reducer.close()
        time.sleep(0.2)
        mux.stop()
