"""An in-process fleet for faults that need no process kill: cheaper than ``FaultRig``.

The aggregator runs in this process on a ``Mux`` of its own and can be stopped and started
again from its state directory (a new ``Aggregator``, as a restarted service would be). Edge
agents share a second ``Mux`` and one training thread; hand-driven devices (``Device``) send
exactly the bytes a test builds. Every part may connect through another address (a proxy).
The outcome is computed as for the process rig (``tests/faults/audit.py``): devices' receipts
against the aggregator's metrics and its logged rejections.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from paho.mqtt.client import CallbackAPIVersion, Client
from paho.mqtt.enums import MQTTProtocolVersion

from aggregator.config import AggregatorConfig, HyperConfig, ModelConfig
from aggregator.evaluation import EvalSet
from aggregator.service import Aggregator
from edge_agent.agent import EdgeAgent
from edge_agent.data import LocalData
from edge_agent.store import AgentStore
from fedge.codecs import parse_codec
from fedge.envelopes import DeviceState, DeviceStatus, ModelUpdate, RoundTask
from fedge.topics import Topics
from fedge.transport.mqtt import BrokerURL
from fedge.transport.mux import Mux
from simulation.broker import MosquittoBroker
from simulation.datasets import FederatedData
from tests.faults.audit import Event, Outcome, audit, late_rejections, recovery_seconds
from tests.integration.fleet_helpers import wait_until

__all__ = ["Device", "LocalFleet", "make_update"]


def make_update(
    weights: dict[str, np.ndarray],
    device: str,
    task: RoundTask,
    *,
    fill: float = 0.0,
    num_samples: int = 10,
    update_id: str | None = None,
) -> bytes:
    """A valid update for ``task`` whose delta is ``fill`` everywhere."""
    delta = {k: np.full_like(v, fill) for k, v in weights.items()}
    return ModelUpdate(
        device=device,
        round=task.round,
        base_version=task.base_version,
        update_id=update_id or uuid.uuid4().hex,
        nonce=task.nonce,
        num_samples=num_samples,
        codec=task.codec,
        delta=parse_codec(task.codec).encode(delta),
    ).to_bytes()


class Device:
    """A hand-driven device: a plain paho client that sends exactly the bytes a test builds.

    Like an agent it has a last will (retained offline status) and can say it is online;
    ``die()`` drops the TCP connection without DISCONNECT, as a power cut does, so the broker
    publishes the will. ``receipts`` holds every update the broker acknowledged.
    """

    def __init__(self, host: str, port: int, device_id: str, topics: Topics) -> None:
        self.device_id = device_id
        self.topics = topics
        self.task: RoundTask | None = None
        self.receipts: list[tuple[str, int, str]] = []
        self._acked: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        self.client = Client(
            CallbackAPIVersion.VERSION2, client_id=device_id, protocol=MQTTProtocolVersion.MQTTv5
        )
        self.client.username_pw_set(device_id)
        offline = DeviceStatus(device_id, DeviceState.OFFLINE, ts=time.time()).to_bytes()
        self.client.will_set(topics.status(device_id), offline, qos=1, retain=True)
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.connect(host, port, keepalive=30)
        self.client.subscribe(topics.task, qos=1)
        self.client.loop_start()
        self._alive = True

    def _on_message(self, _c: Client, _u: object, msg: Any) -> None:
        if msg.payload:  # empty: the round closed (protocol §9.5); the next task follows
            self.task = RoundTask.from_bytes(msg.payload)

    def _on_publish(self, _c: Client, _u: object, mid: int, _rc: object, _p: object) -> None:
        with self._lock:
            self._acked.setdefault(mid, threading.Event()).set()

    def _publish(self, topic: str, payload: bytes, retain: bool, timeout: float) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        with self._lock:
            ev = self._acked.setdefault(info.mid, threading.Event())
        if not ev.wait(timeout):
            raise AssertionError(f"{self.device_id}: the broker did not ack a publish on {topic}")

    def wait_task(self, round_id: int, timeout: float = 30) -> RoundTask:
        wait_until(
            lambda: self.task is not None and self.task.round == round_id,
            timeout,
            f"task {round_id} at {self.device_id}",
        )
        assert self.task is not None
        return self.task

    def announce(self, timeout: float = 10) -> None:
        """Publish the retained online status, as an agent does on every connect."""
        online = DeviceStatus(self.device_id, DeviceState.ONLINE, ts=time.time()).to_bytes()
        self._publish(self.topics.status(self.device_id), online, True, timeout)

    def send(self, payload: bytes, timeout: float = 10) -> None:
        """Publish an update (QoS 1) and wait for the broker's ack; keep the receipt."""
        self._publish(self.topics.update(self.device_id), payload, False, timeout)
        u = ModelUpdate.from_bytes(payload)
        self.receipts.append((u.device, u.round, u.update_id))

    def die(self) -> None:
        """Drop the connection without DISCONNECT: the broker publishes the last will."""
        self._alive = False
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        if self._alive:
            self._alive = False
            self.client.disconnect()
            self.client.loop_stop()


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class LocalFleet:
    def __init__(
        self,
        broker: MosquittoBroker,
        tmp: Path,
        data: FederatedData,
        *,
        label: str = "",
        **cfg: Any,
    ) -> None:
        self.broker = broker
        self.url = BrokerURL.parse(broker.url)
        self.tmp = tmp
        self.data = data
        self.label = label
        self.notes: dict[str, Any] = {}
        self.events: list[Event] = []
        self.recovery: float | None = None  # set by a test that measures recovery itself
        self.topics = Topics(f"t{uuid.uuid4().hex[:8]}")
        self.config = AggregatorConfig(
            broker=str(self.url),
            fleet=self.topics.fleet,
            state_dir=tmp / "aggregator",
            model=ModelConfig(input_dim=data.input_dim, num_classes=data.num_classes),
            hyper=HyperConfig(epochs=1, lr=0.1),
            **cfg,
        )
        self.aggregator: Aggregator | None = None
        self._agg_mux: Mux | None = None
        self.dev_mux = Mux("devices").start()
        self.executor = ThreadPoolExecutor(1)
        self.agents: dict[int, EdgeAgent] = {}
        self.raw: list[Device] = []
        self._log = _Lines()
        logging.getLogger("aggregator").addHandler(self._log)

    def note(self, kind: str, what: str) -> None:
        self.events.append(Event(time.time(), kind, what))

    def bounce_broker(self, broker: MosquittoBroker, down: float = 1.0) -> None:
        """SIGKILL ``broker``, restart it after ``down`` seconds, both on the timeline."""
        self.note("fault", "broker SIGKILL")
        broker.kill()
        time.sleep(down)
        broker.restart()
        self.note("recover", "broker restarted")

    # -- the aggregator -----------------------------------------------------------------------
    def start_aggregator(self, url: str | None = None) -> Aggregator:
        """Start (again) from the state directory; ``url`` overrides the broker address."""
        if self.aggregator is not None:
            self.note("recover", "aggregator restarted")
        cfg = self.config if url is None else self.config.model_copy(update={"broker": url})
        self._agg_mux = Mux("aggregator").start()
        self.aggregator = Aggregator(cfg, self._agg_mux, eval_set=EvalSet(*self.data.test))
        self.aggregator.start()
        return self.aggregator

    def stop_aggregator(self) -> None:
        """DISCONNECT and stop: its persistent session stays on the broker and queues."""
        agg, mux = self.aggregator, self._agg_mux
        if agg is None or mux is None:
            return
        self.note("fault", "aggregator stopped")
        agg.stop()
        wait_until(lambda: not agg.session.connected, 10, "aggregator disconnect")
        time.sleep(0.2)
        mux.stop()
        self._agg_mux = None

    @property
    def agg(self) -> Aggregator:
        assert self.aggregator is not None, "start_aggregator() first"
        return self.aggregator

    # -- devices ------------------------------------------------------------------------------
    def add_agent(self, i: int, url: str | None = None, *, start: bool = True) -> EdgeAgent:
        """Agent ``dev-i`` on partition ``i``; a second call restarts it from its directory."""
        x, y = self.data.parts[i]
        agent = EdgeAgent(
            device_id=f"dev-{i}",
            mux=self.dev_mux,
            broker=BrokerURL.parse(url) if url else self.url,
            topics=self.topics,
            data=LocalData(x, y),
            store=AgentStore(self.tmp / f"dev-{i}"),
            executor=self.executor,
            keepalive=5,
            seed=i,
        )
        self.agents[i] = agent
        if start:
            agent.start()
        return agent

    def stop_agent(self, i: int) -> None:
        agent = self.agents[i]
        agent.stop()
        wait_until(lambda: not agent.session.connected, 10, f"dev-{i} disconnect")

    def raw_device(self, name: str) -> Device:
        d = Device(self.url.host, self.url.port, name, self.topics)
        self.raw.append(d)
        return d

    # -- observation --------------------------------------------------------------------------
    def records(self) -> list[dict[str, Any]]:
        path = self.config.metrics_path
        if not path.exists():
            return []
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]

    def versions(self) -> int:
        return sum(1 for r in self.records() if "version" in r)

    def wait_versions(self, n: int, timeout: float) -> float:
        t0 = time.monotonic()
        wait_until(lambda: self.versions() >= n, timeout, f"{n} versions")
        return time.monotonic() - t0

    def log_text(self) -> str:
        return "\n".join(self._log.lines)

    def acked(self) -> list[tuple[str, int, str]]:
        out = [r for d in self.raw for r in d.receipts]
        for i in self.agents:
            for a in AgentStore(self.tmp / f"dev-{i}").acked():
                out.append((f"dev-{i}", int(a["round"]), str(a["update_id"])))  # type: ignore[call-overload]
        return out

    def outcome(self, recovery: float | None = None) -> Outcome:
        records = self.records()
        if recovery is None:
            recovery = self.recovery
        if recovery is None:
            recovery = recovery_seconds(self.events, records)
        return audit(records, self.acked(), late_rejections(self.log_text()), recovery)

    def close(self) -> None:
        for d in self.raw:
            with contextlib.suppress(Exception):
                d.close()
        for a in self.agents.values():
            a.stop()
        if self.aggregator is not None and self._agg_mux is not None:
            agg = self.aggregator
            agg.stop()
            with contextlib.suppress(AssertionError):
                wait_until(lambda: not agg.session.connected, 5, "aggregator disconnect")
            self._agg_mux.stop()
        time.sleep(0.2)
        self.dev_mux.stop()
        self.executor.shutdown(cancel_futures=True)
        logging.getLogger("aggregator").removeHandler(self._log)
