"""A broker SIGKILL while an acknowledged update is on its way to the (online) aggregator.

Mosquitto 2.0 acknowledges a QoS 1 publish to the device at once, and `autosave_on_changes`
counts only messages *queued* for offline sessions as changes (src/database.c,
``db__message_insert``): a message in flight to a connected subscriber is in no saved
database until something else triggers a save. A SIGKILL then loses it, and the kernel's
reset discards whatever the aggregator had not read yet. The device holds a PUBACK and an
empty outbox, so nobody sends it again. The long soak found this (bench/soak/run.py); here a
proxy holds the aggregator's traffic for 1 s so that the window is hit every time.
"""

from __future__ import annotations

from typing import Any

import pytest

from simulation.broker import MosquittoBroker
from simulation.datasets import FederatedData
from tests.faults.local import make_update
from tests.integration.fleet_helpers import wait_until

pytestmark = [pytest.mark.faults, pytest.mark.integration]


def test_broker_sigkill_loses_an_in_flight_update_of_a_device_without_receipts(
    fresh_broker: MosquittoBroker,
    proxy_factory: Any,
    local_factory: Any,
    digits4: FederatedData,
) -> None:
    # Prepare: the aggregator's link delays 1 s and, when the broker dies, drops what it held.
    # Two devices are online; the round waits for a third (never early) and closes at its
    # deadline with what it has (at least 1).
    proxy = proxy_factory(fresh_broker.port, delay=1.0, flush_on_close=False)
    fleet = local_factory(fresh_broker, digits4, target_devices=3, min_devices=1, round_timeout=12)
    agg = fleet.start_aggregator(url=proxy.url)
    a, b = fleet.raw_device("dev-a"), fleet.raw_device("dev-b")
    for d in (a, b):
        d.announce()
    wait_until(lambda: len(agg.online) == 2, 10, "devices online")
    task = a.wait_task(1)

    # Execute: the broker acks dev-a's update, then dies before the aggregator has it; dev-b
    # answers once the broker is back.
    a.send(make_update(agg.weights, "dev-a", task))
    fleet.bounce_broker(fresh_broker)
    wait_until(lambda: agg.session.connected, 30, "aggregator back")
    b.send(make_update(agg.weights, "dev-b", task))
    fleet.wait_versions(1, 60)

    # Assert: the broker's gap, shown with a hand-driven device that ignores receipts and
    # never resends: its PUBACKed update is lost. (fedge agents resend until the aggregator's
    # receipt: the next test.)
    fleet.notes["bytes_dropped_in_flight"] = proxy.stats.bytes_dropped
    rec = fleet.records()[0]
    assert "dev-b" in rec["counted"]
    assert "dev-a" not in rec["counted"]


def test_agent_resends_until_receipt_after_broker_sigkill_with_update_in_flight(
    fresh_broker: MosquittoBroker,
    proxy_factory: Any,
    local_factory: Any,
    digits4: FederatedData,
) -> None:
    # Prepare: as above, but dev-0 is a real edge agent (outbox kept until the receipt).
    proxy = proxy_factory(fresh_broker.port, delay=1.0, flush_on_close=False)
    fleet = local_factory(fresh_broker, digits4, target_devices=2, min_devices=2, round_timeout=30)
    agg = fleet.start_aggregator(url=proxy.url)
    agent = fleet.add_agent(0)
    b = fleet.raw_device("dev-b")
    b.announce()
    task = b.wait_task(1)

    # Execute: kill the broker as soon as it has acknowledged the agent's update (the
    # aggregator's copy is still held by the 1 s proxy delay), restart it.
    wait_until(lambda: len(agent.store.acked()) >= 1, 60, "the agent's update acknowledged")
    fleet.bounce_broker(fresh_broker)
    wait_until(lambda: agg.session.connected, 30, "aggregator back")
    b.send(make_update(agg.weights, "dev-b", task))
    fleet.wait_versions(1, 60)

    # Assert: the agent's acknowledged update was resent after the reconnect and counted once.
    fleet.notes["bytes_dropped_in_flight"] = proxy.stats.bytes_dropped
    rec = fleet.records()[0]
    assert set(rec["counted"]) == {agent.device_id, "dev-b"}
    out = fleet.outcome()
    assert out.lost == 0, (out, rec["counted"])
    assert out.double_counted == 0
    wait_until(lambda: len(agent.outbox) == 0, 10, "the receipt to clear the outbox")
