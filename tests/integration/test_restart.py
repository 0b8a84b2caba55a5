"""The aggregator as a real process, SIGKILLed mid-run and restarted from its checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml

from aggregator.checkpoint import load_checkpoint
from aggregator.registry import ModelRegistry
from edge_agent.agent import EdgeAgent
from edge_agent.data import LocalData
from edge_agent.store import AgentStore
from fedge.topics import Topics
from fedge.transport.mqtt import BrokerURL
from fedge.transport.mux import Mux
from simulation.broker import MosquittoBroker
from simulation.datasets import make_federated, write_npz_partitions
from tests.integration.fleet_helpers import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "aggregator", "--config", str(config), "--log-level", "WARNING"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


@pytest.fixture
def agents_on(broker: MosquittoBroker, tmp_path: Path) -> Iterator[tuple[Topics, Path]]:
    data = make_federated("digits", 3, "iid", seed=1)
    write_npz_partitions(data, tmp_path / "data")
    topics = Topics(f"t{uuid.uuid4().hex[:8]}")
    mux = Mux("dev").start()
    executor = ThreadPoolExecutor(1)
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
    yield topics, tmp_path
    for a in agents:
        a.stop()
    mux.stop()
    executor.shutdown(cancel_futures=True)


def test_aggregator_sigkill_resumes_without_repeating_or_losing_a_version(
    broker: MosquittoBroker, agents_on: tuple[Topics, Path]
) -> None:
    topics, tmp = agents_on
    state = tmp / "aggregator"
    config = tmp / "aggregator.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "broker": broker.url,
                "fleet": topics.fleet,
                "state_dir": str(state),
                "hyper": {"epochs": 1},
                "rounds": 0,
                "target_devices": 3,
                "min_devices": 3,
                "round_timeout": 30,
                "eval_data": str(tmp / "data" / "test.npz"),
            }
        )
    )
    registry = ModelRegistry(state / "models")
    log = tmp / "aggregator.log"
    proc = _start(config, log)
    try:
        wait_until(lambda: len(registry.versions()) >= 3, 60, "versions 1 and 2 before the kill")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        before = load_checkpoint(state / "checkpoint.msgpack")
        assert before is not None

        proc = _start(config, log)
        wait_until(lambda: max(registry.versions()) >= before.version + 2, 60, "two more versions")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    assert proc.returncode == 0, log.read_text()[-2000:]

    after = load_checkpoint(state / "checkpoint.msgpack")
    assert after is not None
    versions = registry.versions()
    assert versions == list(range(0, after.version + 1)), "a version was lost or skipped"
    records = [json.loads(line) for line in (state / "metrics.jsonl").read_text().splitlines()]
    rounds = [r["round"] for r in records]
    assert rounds == sorted(set(rounds)), f"a round id was reused: {rounds}"
    made = [r["version"] for r in records if "version" in r]
    assert len(made) == len(set(made)), f"a version was produced twice: {made}"
    # The round open at the kill is resumed (from checkpoint + journal), not restarted.
    later = [r for r in records if r.get("version", 0) > before.version]
    assert all(r["round"] >= before.last_round for r in later)
    if before.open_task is not None:
        assert later[0]["round"] == before.last_round
    # Every version counts each of the three devices exactly once.
    total = sum(len(np.load(f)["y"]) for f in sorted((tmp / "data").glob("device-*.npz")))
    assert all(r["devices"] == 3 and r["samples"] == total for r in records if "version" in r)
