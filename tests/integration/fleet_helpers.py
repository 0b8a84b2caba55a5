"""Building blocks for integration tests: real clients against the suite's Mosquitto."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from paho.mqtt.client import CallbackAPIVersion, Client
from paho.mqtt.enums import MQTTProtocolVersion

from aggregator.config import AggregatorConfig, HyperConfig, ModelConfig
from aggregator.evaluation import EvalSet
from aggregator.service import Aggregator
from edge_agent.agent import EdgeAgent
from edge_agent.data import LocalData
from edge_agent.store import AgentStore
from fedge.envelopes import Receipt, RoundTask
from fedge.topics import Topics
from fedge.transport.mqtt import BrokerURL
from fedge.transport.mux import Mux
from simulation.broker import MosquittoBroker
from simulation.datasets import FederatedData

__all__ = ["Fleet", "RawDevice", "update_for", "wait_until"]


def update_for(
    weights: dict[str, Any], device: str, task: RoundTask, key: Any = None, **over: Any
) -> bytes:
    """A valid zero-delta update for ``task`` (fields overridable), signed when ``key`` is given."""
    from dataclasses import replace

    import numpy as np

    from fedge.codecs import parse_codec
    from fedge.envelopes import ModelUpdate

    delta = {k: np.zeros_like(v) for k, v in weights.items()}
    u = ModelUpdate(
        device=device,
        round=task.round,
        base_version=task.base_version,
        update_id=uuid.uuid4().hex,
        nonce=task.nonce,
        num_samples=10,
        codec=task.codec,
        delta=parse_codec(task.codec).encode(delta),
    )
    u = replace(u, **over)
    if key is not None:
        u = replace(u, signature=key.sign(u.digest()))
    return u.to_bytes()


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class RawDevice:
    """A hand-driven device: a plain paho client that reads the task and sends any bytes."""

    def __init__(self, host: str, port: int, device_id: str, fleet_prefix: str) -> None:
        self.device_id = device_id
        self.prefix = fleet_prefix
        self.task: RoundTask | None = None
        self.receipts: list[Receipt] = []
        self._acked: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        self.client = Client(
            CallbackAPIVersion.VERSION2,
            client_id=device_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.username_pw_set(device_id)
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.connect(host, port)
        self.client.subscribe(
            [(f"{fleet_prefix}/round/current", 1), (f"{fleet_prefix}/receipt/{device_id}", 1)]
        )
        self.client.loop_start()

    def _on_message(self, _c: Client, _u: object, msg: Any) -> None:
        if msg.topic.endswith("/round/current"):
            if msg.payload:  # empty: the round closed (protocol §9.5); the next task follows
                self.task = RoundTask.from_bytes(msg.payload)
        else:
            self.receipts.append(Receipt.from_bytes(msg.payload))

    def _on_publish(self, _c: Client, _u: object, mid: int, _rc: object, _p: object) -> None:
        with self._lock:
            self._acked.setdefault(mid, threading.Event()).set()

    def wait_task(self, round_id: int | None = None, timeout: float = 20) -> RoundTask:
        wait_until(
            lambda: self.task is not None and (round_id is None or self.task.round == round_id),
            timeout,
            f"task for {self.device_id}",
        )
        assert self.task is not None
        return self.task

    def send(self, payload: bytes, timeout: float = 5) -> None:
        info = self.client.publish(f"{self.prefix}/update/{self.device_id}", payload, qos=1)
        with self._lock:
            ev = self._acked.setdefault(info.mid, threading.Event())
        assert ev.wait(timeout), "broker did not ack the publish"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


class Fleet:
    """An aggregator and agents in this process, each with its own MQTT connection."""

    def __init__(self, broker: MosquittoBroker, tmp: Path, data: FederatedData, **cfg: Any) -> None:
        self.url = BrokerURL.parse(broker.url)
        self.topics = Topics(f"t{uuid.uuid4().hex[:8]}")
        self.tmp = tmp
        self.data = data
        self.records: list[dict[str, Any]] = []
        self.agg_mux, self.dev_mux = Mux("agg").start(), Mux("dev").start()
        self.executor = ThreadPoolExecutor(1)
        self.agents: dict[str, EdgeAgent] = {}
        self.tasks_seen: dict[str, list[RoundTask]] = {}
        self.config = AggregatorConfig(
            broker=str(self.url),
            fleet=self.topics.fleet,
            state_dir=tmp / "aggregator",
            **{
                "model": ModelConfig(input_dim=data.input_dim, num_classes=data.num_classes),
                "hyper": HyperConfig(epochs=2, lr=0.1),
                **cfg,
            },
        )
        self.aggregator = Aggregator(
            self.config, self.agg_mux, eval_set=EvalSet(*data.test), on_round=self.records.append
        )

    def start_aggregator(self) -> None:
        self.aggregator.start()

    def add_agent(self, i: int, **kw: Any) -> EdgeAgent:
        x, y = self.data.parts[i]
        dev = f"dev-{i}"
        agent = EdgeAgent(
            device_id=dev,
            mux=self.dev_mux,
            broker=self.url,
            topics=self.topics,
            data=LocalData(x, y),
            store=AgentStore(self.tmp / dev),
            seed=i,
            **{"executor": self.executor, **kw},
        )
        self.agents[dev] = agent
        # Every verified task the agent took, in order: the agent itself drops its task when
        # the aggregator clears a closed round's (protocol §9.5), so tests read them here.
        seen = self.tasks_seen.setdefault(dev, [])
        take = agent._on_task
        agent._on_task = lambda t: (seen.append(t), take(t))[1]  # type: ignore[method-assign]
        agent.start()
        return agent

    def restart_aggregator(self, timeout: float = 10.0) -> Aggregator:
        """Stop the aggregator and start a new one on the same config and state directory."""
        self.aggregator.stop()
        wait_until(lambda: not self.aggregator.session.connected, timeout, "aggregator stop")
        self.aggregator = Aggregator(
            self.config,
            self.agg_mux,
            eval_set=EvalSet(*self.data.test),
            on_round=self.records.append,
        )
        self.aggregator.start()
        wait_until(lambda: self.aggregator.session.connected, timeout, "aggregator restart")
        return self.aggregator

    def raw_device(self, name: str) -> RawDevice:
        return RawDevice(self.url.host, self.url.port, name, self.topics.prefix)

    def close(self) -> None:
        for a in self.agents.values():
            a.stop()
        self.aggregator.stop()
        wait_until(lambda: not self.aggregator.session.connected, 5, "aggregator disconnect")
        self.dev_mux.stop()
        self.agg_mux.stop()
        self.executor.shutdown(cancel_futures=True)


def skip_reason_for_task(fleet_factory: Any, **task_fields: Any) -> tuple[EdgeAgent, str]:
    """One device at version 1 of an unsigned fleet is handed a round-2 task with
    ``task_fields`` (fields it cannot honour); returns the agent once it skipped that round,
    and the reason it logged (what follows ``skipping round 2: ``)."""
    import logging
    import os

    from fedge.envelopes import TrainHyper
    from simulation.datasets import make_federated

    reasons: list[str] = []

    class _Skips(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            head, _, reason = record.getMessage().partition(": skipping round 2: ")
            if head == "dev-0" and reason:
                reasons.append(reason)

    data = make_federated("digits", 1, "iid", seed=0)
    fleet = fleet_factory(data, rounds=1, target_devices=1, min_devices=1, round_timeout=30)
    fleet.start_aggregator()
    agent = fleet.add_agent(0)
    wait_until(fleet.aggregator.done.is_set, 30, "version 1")
    wait_until(lambda: agent.model is not None and agent.model.version == 1, 10, "v1 on dev-0")
    task = RoundTask(2, 1, time.time() + 30, "fp32", TrainHyper(), os.urandom(16), **task_fields)
    handler, log = _Skips(), logging.getLogger("edge_agent.agent")
    log.addHandler(handler)
    try:
        agg = fleet.aggregator
        fleet.agg_mux.call_soon(
            lambda: agg.session.publish(fleet.topics.task, task.to_bytes(), retain=True)
        )
        wait_until(lambda: agent.counters.rounds_skipped == 1, 10, "dev-0 skips round 2")
    finally:
        log.removeHandler(handler)
    assert agent.last_round == 2
    assert agent.counters.updates_sent == 1  # round 1 only
    assert len(reasons) == 1, reasons
    return agent, reasons[0]
