"""Model patches over a real Mosquitto: devices follow signed patches, catch up with them,
fall back to the full model when they must, and refuse forged ones; a restarted aggregator
continues the same chain (aggregator/downlink.py, edge_agent/downlink.py).

One hand-driven device (``RawDevice``) moves versions one at a time: each of its updates
closes a round (target 1). The agents under test decline every round, so they only follow.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from paho.mqtt.client import CallbackAPIVersion, Client
from paho.mqtt.enums import MQTTProtocolVersion

from aggregator.evaluation import EvalSet
from aggregator.service import Aggregator
from edge_agent.agent import EdgeAgent
from fedge.codecs import parse_codec
from fedge.envelopes import ModelPatch
from fedge.identity import SigningKey, save_signing_key
from fedge.patches import make_patch, weights_sha256
from simulation.broker import MosquittoBroker
from simulation.datasets import make_federated
from tests.integration.fleet_helpers import Fleet, RawDevice, update_for, wait_until

pytestmark = pytest.mark.integration

RETAIN = 2


def _decline(*_a: Any, **_k: Any) -> None:
    return None  # the agent under test never trains: it only follows the model


@pytest.fixture
def fleet(broker: MosquittoBroker, tmp_path: Path) -> Iterator[tuple[Fleet, RawDevice, Any]]:
    key = SigningKey.generate()
    save_signing_key(tmp_path / "agg.key", key)
    f = Fleet(
        broker, tmp_path, make_federated("digits", 2, "iid", seed=0),
        downlink_codec="topk:0.2+int8+zstd", patch_retain=RETAIN, target_devices=1,
        min_devices=1, round_timeout=60, signing_key=tmp_path / "agg.key",
    )  # fmt: skip
    f.start_aggregator()
    driver = f.raw_device(f"driver-{uuid.uuid4().hex[:6]}")
    yield f, driver, key
    driver.close()
    f.close()


def _agent(f: Fleet, i: int, key: SigningKey) -> EdgeAgent:
    return f.add_agent(i, train_fn=_decline, aggregator_key=key.verify_key)


def _step(f: Fleet, driver: RawDevice, n: int = 1) -> int:
    """Move the model ``n`` versions on with random deltas from the driver."""
    rng = np.random.default_rng(f.aggregator.version)
    for _ in range(n):
        v = f.aggregator.version
        task = driver.wait_task()
        wait_until(lambda t=task, v=v: t.base_version == v, 10, f"task on v{v}")
        weights = f.aggregator.rounds.state.weights
        delta = {k: rng.normal(0, 0.01, a.shape).astype(np.float32) for k, a in weights.items()}
        blob = parse_codec(task.codec).encode(delta)
        for attempt in range(5):  # an aggregator that is (re)subscribing may miss one
            driver.send(update_for(weights, driver.device_id, task, delta=blob))
            try:
                wait_until(lambda v=v: f.aggregator.version == v + 1, 2, f"version {v + 1}")
                break
            except AssertionError:
                if attempt == 4:
                    raise
        wait_until(
            lambda t=task: driver.task is not None and driver.task.round > t.round, 10, "next"
        )
    return f.aggregator.version


def _view_sha(f: Fleet) -> str:
    return weights_sha256(f.aggregator.rounds.state.downlink.view)


def _holds(a: EdgeAgent, f: Fleet) -> bool:
    return (
        a.model is not None
        and a.model.version == f.aggregator.version
        and weights_sha256(a._global_weights(a.model)) == _view_sha(f)
    )


def test_late_joiner_gets_the_full_model_once_then_only_patches(fleet: Any) -> None:
    f, driver, key = fleet
    _step(f, driver, 2)
    a = _agent(f, 0, key)
    wait_until(lambda: _holds(a, f), 10, "joiner on the current version")
    assert a.counters.rx_model_bytes > 0
    assert not a.downlink.full
    models = a.counters.rx_model_bytes
    _step(f, driver, 3)
    wait_until(lambda: _holds(a, f), 10, "joiner follows patches")
    assert a.counters.rx_model_bytes == models  # no full model after the first
    assert a.downlink.patches_applied == 3
    # The model on disk is the patched graph: what `fedge agent predict` loads.
    from models.onnx_weights import read_initializers

    disk = read_initializers(a.store.model_path.read_bytes())
    assert weights_sha256(disk) == _view_sha(f)
    from edge_agent.inference import OnnxPredictor

    x = f.data.test[0][:20]
    served = f.aggregator.registry.path(f.aggregator.version).read_bytes()
    np.testing.assert_array_equal(
        OnnxPredictor.from_path(a.store.model_path).predict_logits(x),
        OnnxPredictor(served).predict_logits(x),
    )  # the patched graph answers exactly as the aggregator's published version


def test_missed_versions_within_retained_catch_up_with_patches_beyond_with_full(
    fleet: Any,
) -> None:
    f, driver, key = fleet
    a = _agent(f, 0, key)
    wait_until(lambda: _holds(a, f), 10, "first model")
    _step(f, driver, 1)
    wait_until(lambda: _holds(a, f), 10, "first patch")
    a.stop()
    wait_until(lambda: not a.session.connected, 5, "agent offline")

    _step(f, driver, RETAIN)  # missed exactly as many as are retained
    b = _agent(f, 0, key)  # the same device, rebooted: same state directory
    wait_until(lambda: _holds(b, f), 10, "catch-up with patches")
    assert b.counters.rx_model_bytes == 0
    assert b.downlink.resyncs == 0
    b.stop()
    wait_until(lambda: not b.session.connected, 5, "agent offline")

    _step(f, driver, RETAIN + 1)  # one more than retained: only the full model helps
    c = _agent(f, 0, key)
    wait_until(lambda: _holds(c, f), 10, "catch-up with the full model")
    assert c.counters.rx_model_bytes > 0
    assert c.downlink.resyncs == 1
    wait_until(lambda: not c.downlink.full, 5, "back on patches")


def test_corrupted_local_weights_resync_on_hash_mismatch(fleet: Any) -> None:
    f, driver, key = fleet
    a = _agent(f, 0, key)
    wait_until(lambda: _holds(a, f), 10, "first model")
    # Weights corrupted in memory (as a flipped bit in RAM or on a disk without checksums):
    # the next patch does not apply to them.
    w = a._global_weights(a.model)  # type: ignore[arg-type]
    a._weights = {k: (v + 1.0 if i == 0 else v) for i, (k, v) in enumerate(w.items())}
    _step(f, driver, 1)
    wait_until(lambda: _holds(a, f), 10, "resync with the full model")
    assert a.downlink.resyncs == 1
    assert a.counters.rx_model_bytes > 0


def test_forged_and_unsigned_patches_are_refused(
    fleet: Any, caplog: pytest.LogCaptureFixture
) -> None:
    f, driver, key = fleet
    a = _agent(f, 0, key)
    wait_until(lambda: _holds(a, f), 10, "first model")
    held = a.model
    assert held is not None
    weights = a._global_weights(held)
    target = {k: v + 0.5 for k, v in weights.items()}
    forged, _ = make_patch(
        weights, target, from_version=held.version, codec="fp32", retained_from=0,
        signing_key=SigningKey.generate(),
    )  # fmt: skip
    unsigned = replace(forged, signature=b"")
    # The local broker profile lets anyone connect as ``aggregator`` (no password): the
    # forger does, while the real aggregator is away (one client id per identity).
    f.aggregator.stop()
    wait_until(lambda: not f.aggregator.session.connected, 5, "aggregator stop")
    forger = Client(CallbackAPIVersion.VERSION2, "aggregator", protocol=MQTTProtocolVersion.MQTTv5)
    forger.username_pw_set("aggregator")
    forger.connect(f.url.host, f.url.port)
    forger.loop_start()
    try:
        with caplog.at_level(logging.WARNING, logger="edge_agent.agent"):
            for p in (forged, unsigned):
                topic = f.topics.model_patch(held.version + 1)
                forger.publish(topic, p.to_bytes(), qos=1).wait_for_publish(5)
            wait_until(lambda: a.counters.patches_rejected == 2, 10, "two refusals")
    finally:
        forger.disconnect()
        forger.loop_stop()
    f.aggregator = Aggregator(
        f.config, f.agg_mux, eval_set=EvalSet(*f.data.test), on_round=f.records.append
    )
    f.aggregator.start()
    assert a.model is not None
    assert a.model.version == held.version
    lines = [r for r in caplog.records if "bad_signature" in r.getMessage()]
    assert len(lines) == 2  # one line per refused patch
    _step(f, driver, 1)  # the real chain still applies
    wait_until(lambda: _holds(a, f), 10, "next real patch")


def test_restarted_aggregator_continues_the_same_chain(fleet: Any) -> None:
    f, driver, key = fleet
    a = _agent(f, 0, key)
    _step(f, driver, 2)
    wait_until(lambda: _holds(a, f), 10, "agent on v2")
    before = _view_sha(f)
    patches_before = list(f.aggregator.rounds.state.downlink.patches)
    f.restart_aggregator()
    assert _view_sha(f) == before  # the view came back from the checkpoint
    assert f.aggregator.rounds.state.downlink.patches == patches_before
    _step(f, driver, 2)
    wait_until(lambda: _holds(a, f), 10, "agent follows the resumed chain")
    assert a.downlink.resyncs == 0
    assert a.downlink.patches_applied >= 4
    last = ModelPatch.from_bytes(f.aggregator.rounds.state.downlink.patches[-1][1])
    assert last.sha256 == _view_sha(f)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_simulated_fleet_takes_one_full_model_each_then_patches(tmp_path: Path, mode: str) -> None:
    """A whole fleet (``fedge simulate``, signed): every device ends on the aggregator's last
    version, bit for bit, having received the full model once."""
    import json

    from models.onnx_weights import read_initializers
    from simulation.fleet import SimConfig, simulate

    out = tmp_path / "run"
    cfg = SimConfig(
        out=out, devices=4, rounds=4, epochs=1, mode=mode, async_buffer=2,
        downlink_codec="topk:0.1+int4+zstd",
    )  # fmt: skip
    s = simulate(cfg, say=lambda _line: None)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    model_packet = max(r["model_bytes"] for r in records if "version" in r)
    assert s["downlink_model_bytes"] <= cfg.devices * model_packet  # one full model each
    assert s["downlink_patch_bytes"] > 0
    assert s["resyncs"] == 0
    assert s["patches_rejected"] == 0
    final = weights_sha256(read_initializers(Path(s["model_onnx"]).read_bytes()))
    for dev in sorted((out / "agents").iterdir()):
        held = read_initializers((dev / "model.onnx").read_bytes())
        assert weights_sha256(held) == final, dev.name


def test_aggregator_sigkilled_between_patches_resumes_the_same_chain(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    """The aggregator as a real process, SIGKILLed between a version's checkpoint and its
    publication: the restarted one sends the checkpointed patch and continues the chain, so
    devices keep applying patches (no resync) and end on the checkpointed view, bit for bit."""
    import os
    import signal
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    import yaml

    from aggregator.checkpoint import load_checkpoint
    from aggregator.registry import ModelRegistry
    from edge_agent.data import LocalData
    from edge_agent.store import AgentStore
    from fedge.topics import Topics
    from fedge.transport.mqtt import BrokerURL
    from fedge.transport.mux import Mux

    data = make_federated("digits", 2, "iid", seed=1)
    topics = Topics(f"t{uuid.uuid4().hex[:8]}")
    state = tmp_path / "aggregator"
    config = tmp_path / "aggregator.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "broker": broker.url, "fleet": topics.fleet, "state_dir": str(state),
                "hyper": {"epochs": 1}, "rounds": 0, "target_devices": 2, "min_devices": 2,
                "round_timeout": 30, "downlink_codec": "topk:0.1+int4+zstd", "patch_retain": 4,
            }
        )
    )  # fmt: skip
    log = tmp_path / "aggregator.log"

    def start(crash_at: str | None = None) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if k != "FEDGE_CRASH_AT"}
        if crash_at is not None:
            env["FEDGE_CRASH_AT"] = crash_at
        with log.open("ab") as f:
            return subprocess.Popen(
                [sys.executable, "-m", "aggregator", "--config", str(config),
                 "--log-level", "WARNING"],
                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            )  # fmt: skip

    mux, executor = Mux("dev").start(), ThreadPoolExecutor(1)
    agents = [
        EdgeAgent(
            device_id=f"dev-{i}",
            mux=mux,
            broker=BrokerURL.parse(broker.url),
            topics=topics,
            data=LocalData(x, y),
            store=AgentStore(tmp_path / f"dev-{i}"),
            executor=executor,
            seed=i,
        )
        for i, (x, y) in enumerate(data.parts)
    ]
    for a in agents:
        a.start()
    registry = ModelRegistry(state / "models")
    # Killed right after version 1 and its patch were checkpointed, before either was sent.
    proc = start(crash_at="after_version_checkpoint")
    try:
        assert proc.wait(60) == -signal.SIGKILL, log.read_text()[-2000:]
        before = load_checkpoint(state / "checkpoint.msgpack")
        assert before is not None
        assert before.view is not None
        assert [v for v, _ in before.patches] == [1]
        assert all(a.model is not None and a.model.version == 0 for a in agents)
        proc = start()
        wait_until(lambda: max(registry.versions()) >= before.version + 2, 60, "two more")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    try:
        after = load_checkpoint(state / "checkpoint.msgpack")
        assert after is not None
        assert after.view is not None
        view = weights_sha256(after.view)
        wait_until(
            lambda: all(a.model is not None and a.model.version == after.version for a in agents),
            10,
            "devices on the last version",
        )
        for a in agents:
            assert a.model is not None
            assert weights_sha256(a._global_weights(a.model)) == view
            assert a.downlink.resyncs == 0
            assert a.downlink.patches_applied >= after.version - 1
        # The chain runs through the kill: consecutive, each patch's result is the next base.
        chain = [ModelPatch.from_bytes(p) for _, p in after.patches]
        assert [p.to_version for p in chain] == list(
            range(after.version - len(chain) + 1, after.version + 1)
        )
        assert chain[-1].sha256 == view
    finally:
        for a in agents:
            a.stop()
        mux.stop()
        executor.shutdown(cancel_futures=True)
