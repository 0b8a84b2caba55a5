"""A bad network between the fleet and the broker: latency, jitter and dropped links."""

from __future__ import annotations

import statistics
from typing import Any

import pytest

from simulation.broker import MosquittoBroker
from simulation.datasets import FederatedData
from tests.integration.fleet_helpers import wait_until

pytestmark = [pytest.mark.faults, pytest.mark.integration]

RESETS = 10


def test_latency_and_connection_resets(
    broker: MosquittoBroker, proxy_factory: Any, local_factory: Any, digits4: FederatedData
) -> None:
    # Prepare: every client (aggregator included) reaches the broker through a proxy that
    # delays each chunk 30-70 ms and resets each connection after 0.5-2 s (at most one reset
    # per 0.4 s fleet-wide, 10 in all); a reset drops what was in flight.
    proxy = proxy_factory(
        broker.port,
        delay=0.03,
        jitter=0.04,
        reset_after=(0.5, 2.0),
        max_resets=RESETS,
        min_interval=0.4,
        seed=12,
    )
    fleet = local_factory(broker, digits4, target_devices=3, min_devices=3, round_timeout=60)

    # Execute
    fleet.start_aggregator(url=proxy.url)
    for i in range(3):
        fleet.add_agent(i, url=proxy.url)
    wait_until(lambda: proxy.stats.resets >= RESETS, 120, f"{RESETS} resets")
    fleet.wait_versions(fleet.versions() + 2, 120)  # and rounds complete after the last

    # Assert: the links did break, and every round still counted each device once.
    stats = proxy.stats
    records = [r for r in fleet.records() if "version" in r]
    seconds = [r["seconds"] for r in records]
    fleet.recovery = max(seconds)
    fleet.notes.update(
        resets=stats.resets,
        bytes_dropped=stats.bytes_dropped,
        connections=stats.connections,
        round_seconds_median=round(statistics.median(seconds), 2),
        round_seconds_max=round(max(seconds), 2),
        delay_ms="30-70",
    )
    assert stats.connections > 4 + RESETS // 2, stats  # the clients came back each time
    assert all(sorted(r["counted"]) == ["dev-0", "dev-1", "dev-2"] for r in records)
    out = fleet.outcome()
    assert (out.lost, out.double_counted, out.failed_rounds) == (0, 0, 0), out
