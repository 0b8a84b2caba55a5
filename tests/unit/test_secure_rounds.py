"""Secure rounds of the real service over the in-memory broker and a manual clock: stage
deadlines, a short stage failing the round, a broker outage mid-round, and a whole round with
hand-driven devices (the protocol clients of fedge.secagg). Over Mosquitto:
tests/integration/test_secagg_e2e.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.config import AggregatorConfig, ModelConfig, SecureAggregationConfig
from aggregator.service import Aggregator
from fedge.envelopes import DeviceState, DeviceStatus
from fedge.limits import DEFAULT_LIMITS
from fedge.secagg.client import SecAggClient
from fedge.secagg.messages import Inbox, Open, Roster, Signed, Unmask, read_body
from fedge.secagg.ring import flatten
from fedge.topics import Topics
from fedge.transport.base import SessionRequest
from fedge.transport.memory import ManualLoop, MemoryBroker
from fedge.wire import unpack_map

TOPICS = Topics("unit")
SA = SecureAggregationConfig(advertise_timeout=5, share_timeout=5, unmask_timeout=5)


class Device:
    """A device that runs the protocol client by hand on the memory broker."""

    def __init__(self, broker: MemoryBroker, name: str) -> None:
        self.name = name
        self.client: SecAggClient | None = None
        self.stage: list[Any] = []
        self.session = broker.session(
            SessionRequest(name, [TOPICS.secagg_stage, TOPICS.inbox(name)], on_message=self._on)
        )
        self.session.start()
        self.session.publish(
            TOPICS.status(name), DeviceStatus(name, DeviceState.ONLINE).to_bytes(), retain=True
        )

    def _on(self, topic: str, payload: bytes) -> None:
        signed = Signed.from_bytes(payload, DEFAULT_LIMITS)
        kind = unpack_map(signed.body, DEFAULT_LIMITS)["type"]
        cls = {"open": Open, "roster": Roster, "unmask": Unmask, "inbox": Inbox}[kind]
        self.stage.append(read_body(signed, cls, DEFAULT_LIMITS))

    def send(self, stage: str, signed: Signed) -> None:
        self.session.publish(TOPICS.secagg(stage, self.name), signed.to_bytes())

    def last(self, cls: type) -> Any:
        return next(m for m in reversed(self.stage) if isinstance(m, cls))


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Any]:
    broker, loop = MemoryBroker(), ManualLoop()
    records: list[dict[str, Any]] = []
    started: list[Aggregator] = []

    def start(**cfg: Any) -> Aggregator:
        config = AggregatorConfig(
            broker="mqtt://127.0.0.1:1",
            fleet="unit",
            state_dir=tmp_path / "aggregator",
            model=ModelConfig(name="logreg", input_dim=8, num_classes=3),
            secure_aggregation=SA,
            **{"round_timeout": 60, **cfg},
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


def _failures(agg: Aggregator) -> list[str]:
    lines = [json.loads(x) for x in agg.metrics.path.read_text().splitlines()]
    return [x["failed"] for x in lines if "failed" in x]


def test_a_stage_short_of_quorum_fails_the_round_at_its_deadline(rig: Any) -> None:
    broker, loop, _, start = rig
    agg = start(target_devices=2, min_devices=2)
    a = Device(broker, "dev-a")
    Device(broker, "dev-b")  # online, never advertises
    loop.run()
    opened = a.last(Open)
    a.client = SecAggClient("dev-a", opened)
    a.send("advertise", a.client.advertise())
    loop.advance(4.9)
    assert agg.failed_rounds == 0
    loop.advance(0.2)
    assert agg.failed_rounds == 1
    assert _failures(agg) == ["secagg advertise: 1 of 2 devices advertised keys"]
    assert agg.version == 0
    assert agg.round is not None  # the next round is open
    assert a.last(Open).round == 2


def test_a_broker_outage_mid_round_fails_it_once_the_broker_is_back(rig: Any) -> None:
    broker, loop, _, start = rig
    agg = start(target_devices=2, min_devices=1)
    Device(broker, "dev-a")
    loop.run()
    agg.session.drop()  # type: ignore[attr-defined]
    loop.advance(30)  # stage deadlines pass while away: nothing fails yet
    assert agg.failed_rounds == 0
    agg.session.start()
    loop.run()
    assert _failures(agg) == ["secagg advertise: broker connection lost mid-round"]
    assert agg.round is not None
    assert agg.round.round == 2


def test_a_whole_secure_round_over_the_memory_broker(rig: Any) -> None:
    broker, loop, records, start = rig
    agg = start(target_devices=3, min_devices=2, rounds=1)
    devs = [Device(broker, f"dev-{c}") for c in "abc"]
    loop.run()
    base = {k: v.copy() for k, v in agg.weights.items()}
    for d in devs:
        d.client = SecAggClient(d.name, d.last(Open))
        d.send("advertise", d.client.advertise())
    loop.run()  # every online device advertised: the roster goes out at once
    for d in devs[:2]:  # dev-c vanishes after advertising
        assert d.client is not None
        d.send("shares", d.client.share(d.last(Roster)))
    loop.advance(5.1)  # dev-c is still online: the shares stage runs to its deadline
    rng = np.random.default_rng(0)
    inputs = {}
    for d in devs[:2]:
        assert d.client is not None
        d.client.receive(d.last(Inbox))
        inputs[d.name] = d.client.ring.encode(rng.normal(0, 0.1, 8 * 3 + 3), 10, rng)
        d.send("masked", d.client.masked(inputs[d.name]))
    loop.run()
    for d in devs[:2]:
        assert d.client is not None
        d.send("reply", d.client.unmask(d.last(Unmask)))
    loop.run()
    assert records, _failures(agg)
    assert records[0]["devices"] == 2
    ring = devs[0].client.ring  # type: ignore[union-attr]
    acc = np.zeros(28, np.uint64)
    for q in inputs.values():
        ring.add(acc, q)
    values, weight = ring.decode_sum(acc)
    moved = flatten({k: agg.weights[k].astype(np.float64) - base[k] for k in base})
    np.testing.assert_allclose(moved, values / weight, atol=1e-6)
