"""What the broker delivers to the aggregator: queue limits, duplicates and late updates."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.registry import ModelRegistry
from models.onnx_weights import read_initializers
from simulation.broker import CONFIG_DIR, MosquittoBroker
from simulation.datasets import FederatedData
from tests.faults.local import LocalFleet, make_update
from tests.faults.proxy import ChaosProxy
from tests.integration.fleet_helpers import wait_until

pytestmark = [pytest.mark.faults, pytest.mark.integration]

SMALL_QUEUE = 4
PUBLISHERS = 12


@pytest.fixture
def small_queue_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """Our broker config with ``max_queued_messages 4``: Mosquitto's loss mode, made visible."""
    text = (CONFIG_DIR / "local.conf.template").read_text()
    text, n = re.subn(
        r"^max_queued_messages .*$", f"max_queued_messages {SMALL_QUEUE}", text, flags=re.M
    )
    assert n == 1, "broker_config/local.conf.template no longer sets max_queued_messages"
    template = tmp_path / "small-queue.conf.template"
    template.write_text(text)
    with MosquittoBroker(tmp_path / "small-broker", template=template) as b:
        yield b


def _partitioned_burst(fleet: LocalFleet, proxy: ChaosProxy) -> tuple[float, float]:
    """Open round 1, cut the aggregator off the broker, let every device publish, reconnect.

    Returns (seconds the aggregator was cut off, seconds from the reconnect to version 1).
    """
    agg = fleet.start_aggregator(url=proxy.url)
    devices = [fleet.raw_device(f"dev-{i}") for i in range(PUBLISHERS)]
    tasks = [d.wait_task(1) for d in devices]
    for d in devices:
        d.announce()  # online, as agents say on connect: the round waits for all of them
    wait_until(lambda: len(agg.online) == PUBLISHERS, 10, "devices online")
    time.sleep(0.5)  # let the aggregator's PUBACKs of those statuses reach the broker
    t_off = time.monotonic()
    proxy.block()
    wait_until(lambda: not agg.session.connected, 10, "aggregator cut off")
    for d, task in zip(devices, tasks, strict=True):
        d.send(make_update(agg.weights, d.device_id, task))  # the broker acks each one
    t_on = time.monotonic()
    proxy.unblock()
    fleet.wait_versions(1, 60)
    return t_on - t_off, time.monotonic() - t_on


def test_aggregator_offline_beyond_the_broker_queue(
    small_queue_broker: MosquittoBroker,
    fresh_broker: MosquittoBroker,
    proxy_factory: Any,
    local_factory: Any,
    digits4: FederatedData,
) -> None:
    # Prepare: the same fleet against a broker that queues 4 messages per offline client, and
    # against ours (100,000). The aggregator reaches the broker through a proxy that can cut
    # it off. Round 1 closes at 12 updates, or at its deadline with >= 1.
    cfg = {"target_devices": PUBLISHERS, "min_devices": 1, "round_timeout": 6}
    runs = [
        (
            local_factory(
                small_queue_broker, digits4, label=f"max_queued_messages {SMALL_QUEUE}", **cfg
            ),
            proxy_factory(small_queue_broker.port),
        ),
        (
            local_factory(fresh_broker, digits4, label="broker_config (100000)", **cfg),
            proxy_factory(fresh_broker.port),
        ),
    ]

    # Execute
    for fleet, proxy in runs:
        offline, back = _partitioned_burst(fleet, proxy)
        fleet.recovery = back
        fleet.notes.update(published=PUBLISHERS, offline_seconds=round(offline, 2))

    # Assert: the small queue drops what exceeds it, silently for the devices (they were
    # acked), loudly in the broker log; our config loses nothing.
    (small, _), (ours, _) = runs
    lossy, clean = small.outcome(), ours.outcome()
    small.notes["delivered"] = lossy.counted
    ours.notes["delivered"] = clean.counted
    # The queue holds 4 messages; an update can also lose its slot to a message that was in
    # flight to the aggregator at the cut (e.g. the PUBACK of a status not yet sent).
    assert lossy.acked == PUBLISHERS
    assert 1 <= lossy.counted <= SMALL_QUEUE
    assert lossy.lost == PUBLISHERS - lossy.counted
    assert "Outgoing messages are being dropped for client aggregator" in (
        small_queue_broker.log_path.read_text()
    )
    assert (clean.acked, clean.counted, clean.lost, clean.double_counted) == (
        PUBLISHERS,
        PUBLISHERS,
        0,
        0,
    )


def test_restarted_aggregator_counts_the_queued_updates(
    fresh_broker: MosquittoBroker, local_factory: Any, digits4: FederatedData
) -> None:
    # Regression: a restarted aggregator knows no device as online until the retained statuses
    # come back, after the queued updates; it closed round 1 at the first 2 of them and
    # rejected the other 4 as wrong_round (fixed: early close waits until the expected devices
    # have announced themselves).
    # Prepare: 6 online devices, round 1 needs 6 (quorum 2); the aggregator goes down.
    fleet = local_factory(fresh_broker, digits4, target_devices=6, min_devices=2, round_timeout=30)
    agg = fleet.start_aggregator()
    devices = [fleet.raw_device(f"dev-{i}") for i in range(6)]
    tasks = [d.wait_task(1) for d in devices]
    for d in devices:
        d.announce()
    wait_until(lambda: len(agg.online) == 6, 10, "devices online")
    fleet.stop_aggregator()
    for d, task in zip(devices, tasks, strict=True):
        d.send(make_update(agg.weights, d.device_id, task))

    # Execute: restart it; the broker delivers the six queued updates.
    fleet.start_aggregator()
    fleet.wait_versions(1, 60)

    # Assert
    assert fleet.records()[0]["devices"] == 6, fleet.records()[0]


def test_duplicate_delivery_is_counted_once(
    broker: MosquittoBroker, local_factory: Any, digits4: FederatedData
) -> None:
    # Prepare
    fleet = local_factory(broker, digits4, target_devices=2, min_devices=2, round_timeout=60)
    agg = fleet.start_aggregator()
    a, b = fleet.raw_device("dev-a"), fleet.raw_device("dev-b")
    task = a.wait_task(1)
    b.wait_task(1)
    payload = make_update(agg.weights, "dev-a", task, fill=0.25)

    # Execute: the same update three times: twice live, once queued while the aggregator is
    # offline and delivered to the restarted one (which knows dev-a from its journal).
    a.send(payload)
    a.send(payload)
    wait_until(lambda: agg.metrics.rejected["duplicate"] >= 1, 10, "first duplicate")
    fleet.stop_aggregator()
    a.send(payload)
    agg = fleet.start_aggregator()
    wait_until(lambda: agg.metrics.rejected["duplicate"] >= 1, 30, "duplicate after restart")
    b.send(make_update(agg.weights, "dev-b", task))
    fleet.wait_versions(1, 30)

    # Assert
    rec = fleet.records()[0]
    assert rec["counted"] == {
        "dev-a": fleet.raw[0].receipts[0][2],
        "dev-b": fleet.raw[1].receipts[0][2],
    }
    assert len({r[2] for r in fleet.raw[0].receipts}) == 1  # three receipts, one update id
    assert rec["rejected"] == {"duplicate": 1}  # the restarted aggregator's count
    out = fleet.outcome()
    assert (out.counted, out.lost, out.double_counted) == (2, 0, 0)
    # FedAvg of 0.25 (10 samples) and 0 (10 samples): 0.125 once, not 0.25 * 2/3 or more.
    v0 = read_initializers(ModelRegistry(fleet.config.state_dir / "models").path(0).read_bytes())
    v1 = read_initializers(ModelRegistry(fleet.config.state_dir / "models").path(1).read_bytes())
    for k, w in v0.items():
        np.testing.assert_allclose(v1[k], w + np.float32(0.125), rtol=0, atol=1e-6)


def test_stale_outbox_entry_after_a_reboot_is_counted_once(
    broker: MosquittoBroker, local_factory: Any, digits4: FederatedData
) -> None:
    # Prepare: dev-0's outbox keeps its update after the broker's ack, as a crash between the
    # PUBACK and the outbox delete (no crash point there) would leave it. A hand-driven
    # device holds round 1 open.
    fleet = local_factory(broker, digits4, target_devices=2, min_devices=2, round_timeout=60)
    agg = fleet.start_aggregator()
    holder = fleet.raw_device("dev-9")
    task = holder.wait_task(1)
    agent = fleet.add_agent(0, start=False)
    agent.outbox.remove = lambda *_a: None  # type: ignore[method-assign]
    agent.start()
    wait_until(lambda: agent.store.last_round() == 1, 60, "dev-0 to send round 1")
    assert len(agent.outbox) == 1
    uid = agent.outbox.pending()[0][1]
    fleet.stop_agent(0)

    # Execute: reboot dev-0 with the stale entry; then the round closes.
    again = fleet.add_agent(0)
    wait_until(lambda: agg.metrics.rejected["duplicate"] >= 1, 30, "stale resend refused")
    holder.send(make_update(agg.weights, "dev-9", task))
    fleet.wait_versions(1, 30)

    # Assert: counted once, under the original id; the resend emptied the outbox.
    rec = fleet.records()[0]
    assert rec["counted"]["dev-0"] == uid
    assert rec["rejected"] == {"duplicate": 1}
    assert [p for p in again.outbox.pending() if p[0] == 1] == []
    ids = [a["update_id"] for a in again.store.acked() if a["round"] == 1]
    assert ids == [uid, uid]  # acked by the broker twice, counted once
    out = fleet.outcome()
    assert (out.lost, out.double_counted) == (0, 0)


def test_late_update_is_rejected_and_leaves_the_model_alone(
    broker: MosquittoBroker, local_factory: Any, digits4: FederatedData
) -> None:
    # Prepare: dev-a and dev-b send zero deltas; dev-late holds a round-1 update of ones.
    fleet = local_factory(broker, digits4, target_devices=2, min_devices=2, round_timeout=60)
    agg = fleet.start_aggregator()
    a, b, late = (fleet.raw_device(n) for n in ("dev-a", "dev-b", "dev-late"))
    task1 = late.wait_task(1)
    stale = make_update(agg.weights, "dev-late", task1, fill=1.0)
    for d in (a, b):
        d.send(make_update(agg.weights, d.device_id, d.wait_task(1)))
    fleet.wait_versions(1, 30)

    # Execute: round 1 is closed; its late update arrives in round 2.
    late.send(stale)
    wait_until(lambda: agg.metrics.rejected["wrong_round"] >= 1, 10, "late update refused")
    for d in (a, b):
        d.send(make_update(agg.weights, d.device_id, d.wait_task(2)))
    fleet.wait_versions(2, 30)

    # Assert: refused with its reason, counted in the metrics, and v2 == v1 bit for bit.
    records = fleet.records()
    assert records[1]["rejected"] == {"wrong_round": 1}
    assert "dev-late" not in records[0]["counted"]
    assert "dev-late" not in records[1]["counted"]
    reg = ModelRegistry(fleet.config.state_dir / "models")
    v1, v2 = (read_initializers(reg.path(v).read_bytes()) for v in (1, 2))
    for k in v1:
        np.testing.assert_array_equal(v2[k], v1[k])
    out = fleet.outcome()
    assert (out.rejected, out.lost, out.double_counted) == (1, 0, 0)
