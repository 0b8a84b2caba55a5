"""Devices that never answer: the round ends at its deadline, or early once their will fires."""

from __future__ import annotations

import time
from typing import Any

import pytest

from simulation.broker import MosquittoBroker
from simulation.datasets import FederatedData
from tests.faults.local import make_update
from tests.integration.fleet_helpers import wait_until

pytestmark = [pytest.mark.faults, pytest.mark.integration]

TIMEOUT = 6.0


def test_silent_device_deadline_then_last_will(
    broker: MosquittoBroker, local_factory: Any, digits4: FederatedData
) -> None:
    # Prepare: three devices say they are online, as agents do; dev-silent never answers.
    fleet = local_factory(broker, digits4, target_devices=3, min_devices=2, round_timeout=TIMEOUT)
    agg = fleet.start_aggregator()
    a, b, silent = (fleet.raw_device(n) for n in ("dev-a", "dev-b", "dev-silent"))
    for d in (a, b, silent):
        d.announce()
    wait_until(lambda: len(agg.online) == 3, 10, "three devices online")

    # Execute 1: round 1 waits for the silent device until the deadline, then closes.
    for d in (a, b):
        d.send(make_update(agg.weights, d.device_id, d.wait_task(1)))
    fleet.wait_versions(1, 3 * TIMEOUT)
    # Execute 2: in round 2 the silent device's link dies without DISCONNECT.
    for d in (a, b):
        d.send(make_update(agg.weights, d.device_id, d.wait_task(2)))
    wait_until(lambda: agg.round is not None and len(agg.round.counted) == 2, 10, "round 2 pair")
    silent.die()
    t_dead = time.time()  # die() returns once the socket is closed
    fleet.wait_versions(2, 3 * TIMEOUT)

    # Assert: round 1 took its whole deadline with quorum; round 2 closed on the will.
    r1, r2 = fleet.records()
    assert sorted(r1["counted"]) == sorted(r2["counted"]) == ["dev-a", "dev-b"]
    assert r1["seconds"] >= TIMEOUT - 0.5, r1
    will_to_close = r2["ts"] - t_dead
    fleet.recovery = will_to_close
    fleet.notes.update(
        round1_seconds=round(r1["seconds"], 2), will_to_close=round(will_to_close, 2)
    )
    assert r2["seconds"] < TIMEOUT - 1.0, r2
    assert will_to_close < 2.0
    assert "dev-silent" not in agg.online
    out = fleet.outcome()
    assert (out.lost, out.double_counted, out.failed_rounds) == (0, 0, 0)


def test_round_short_of_quorum_fails_explicitly(
    broker: MosquittoBroker, local_factory: Any, digits4: FederatedData
) -> None:
    # Prepare: quorum 2; only dev-a answers round 1, dev-silent is online and mute.
    fleet = local_factory(broker, digits4, target_devices=3, min_devices=2, round_timeout=2.0)
    agg = fleet.start_aggregator()
    a, b, silent = (fleet.raw_device(n) for n in ("dev-a", "dev-b", "dev-silent"))
    silent.announce()
    wait_until(lambda: "dev-silent" in agg.online, 10, "dev-silent online")

    # Execute: round 1 fails at its deadline; round 2 (a new id) gets two answers.
    a.send(make_update(agg.weights, "dev-a", a.wait_task(1)))
    for d in (a, b):
        d.send(make_update(agg.weights, d.device_id, d.wait_task(2, timeout=10)))
    fleet.wait_versions(1, 10)

    # Assert: the failure is a record with its reason; nothing waited forever.
    failed, done = fleet.records()
    assert failed["round"] == 1
    assert failed["failed"] == "quorum not met: 1 of 2 by deadline"
    assert "version" not in failed
    assert done["round"] == 2
    assert sorted(done["counted"]) == ["dev-a", "dev-b"]
    assert agg.version == 1
    out = fleet.outcome()
    assert (out.in_failed_rounds, out.lost, out.double_counted) == (1, 0, 0)
