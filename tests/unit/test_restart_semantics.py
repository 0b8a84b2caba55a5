"""What a restart of the aggregator means (docs/operations.md, Restarts), on the memory broker:
``rounds`` is a total across restarts; a resumed round reports its real duration and bytes;
a closed sync round's task is cleared before the next version is out."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest

from fedge.envelopes import GlobalModel, ModelUpdate, RoundTask
from fedge.transport.base import SessionRequest
from fedge.transport.memory import MemoryBroker
from fedge.transport.mqtt import publish_packet_size
from tests.unit.test_service_rounds import TOPICS, Device, current_task, random_delta
from tests.unit.test_service_rounds import rig as rig


def test_rounds_is_a_total_across_restarts(rig: Any, caplog: pytest.LogCaptureFixture) -> None:
    broker, _loop, _records, start = rig
    agg = start(target_devices=1, min_devices=1, rounds=1)
    Device(broker, "dev-a").send(current_task(broker), random_delta(agg.weights, 1), 10)
    assert (agg.version, agg.done.is_set()) == (1, True)
    agg.stop()

    with caplog.at_level(logging.WARNING, logger="aggregator.lifecycle"):
        again = start(target_devices=1, min_devices=1, rounds=1)
    more = start(target_devices=1, min_devices=1, rounds=2)

    assert again.done.is_set()  # at v1 with rounds 1: nothing more to train
    assert again.round is None
    assert "the model is at v1 and rounds is 1 (a total across restarts" in caplog.text
    assert not more.done.is_set()  # rounds 2: one more round, not two
    assert more.round is not None
    assert (more.round.round, more.round.task.base_version) == (2, 1)


def test_a_resumed_round_reports_its_real_duration_and_bytes(rig: Any) -> None:
    broker, _loop, records, start = rig
    agg = start(target_devices=2, min_devices=2, round_timeout=60)
    task = current_task(broker)
    sizes: list[int] = []
    for name in ("dev-a", "dev-b"):
        sizes.append(_send(broker, name, task, random_delta(agg.weights, len(sizes))))
        if len(sizes) == 1:
            agg.stop()  # dev-a's update is journaled; the service stops mid-round
            time.sleep(0.2)
            agg = start(target_devices=2, min_devices=2, round_timeout=60)
            assert agg.round is not None
            assert agg.round.resumed

    (rec,) = records
    assert rec["resumed"] is True
    assert rec["uplink_bytes"] == sum(sizes)  # the replayed update's bytes count
    assert rec["seconds"] >= 0.2  # from the task's issue time, not from the restart
    assert rec["seconds"] >= time.time() - task.issued - 1.0


def _send(broker: MemoryBroker, name: str, task: RoundTask, delta: Any) -> int:
    """``Device.send``, returning the packet size of what it sent."""
    dev = Device(broker, name)
    sent: list[bytes] = []
    original = dev.session.publish

    def publish(topic: str, payload: bytes, **kw: Any) -> Any:
        sent.append(payload)
        return original(topic, payload, **kw)

    dev.session.publish = publish  # type: ignore[method-assign]
    dev.send(task, delta, num_samples=10)
    assert ModelUpdate.from_bytes(sent[0]).device == name
    return publish_packet_size(TOPICS.update(name), len(sent[0]))


def test_a_closed_rounds_task_is_cleared_before_the_next_version_is_out(rig: Any) -> None:
    broker, _loop, _records, start = rig
    seen: list[tuple[str, bytes]] = []
    watcher = broker.session(
        SessionRequest(
            "watcher",
            [TOPICS.task, TOPICS.model],
            on_message=lambda topic, payload: seen.append((topic, payload)),
        )
    )
    watcher.start()
    agg = start(target_devices=1, min_devices=1, round_timeout=60)
    task = current_task(broker)
    seen.clear()

    Device(broker, "dev-a").send(task, random_delta(agg.weights, 5), num_samples=10)

    # the closed task goes first (empty, retained: a device connecting now gets no task),
    # then model v1, then the task of round 2 for v1
    assert seen[0] == (TOPICS.task, b"")
    assert [t for t, _ in seen[1:]] == [TOPICS.model, TOPICS.task]
    assert GlobalModel.from_bytes(seen[1][1]).version == 1
    nxt = RoundTask.from_bytes(seen[2][1])
    assert (nxt.round, nxt.base_version) == (2, 1)
    assert current_task(broker) == nxt


def test_an_async_round_keeps_its_task_when_a_version_is_published(rig: Any) -> None:
    # async: devices may still answer an older round within the window: nothing is cleared
    broker, _loop, _records, start = rig
    seen: list[bytes] = []
    watcher = broker.session(
        SessionRequest("watcher", [TOPICS.task], on_message=lambda _t, p: seen.append(p))
    )
    watcher.start()
    agg = start(mode="async", async_buffer=1, min_devices=1, target_devices=1)
    seen.clear()

    Device(broker, "dev-a").send(current_task(broker), random_delta(agg.weights, 6), 10)

    assert agg.version == 1
    assert b"" not in seen
