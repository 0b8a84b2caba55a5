"""Crashes of the broker and of the aggregator, mid-round and at the worst moments."""

from __future__ import annotations

import time
from typing import Any

import pytest

pytestmark = [pytest.mark.faults, pytest.mark.integration]


def assert_clean(rig: Any) -> None:
    out = rig.outcome()
    assert out.lost == 0, out
    assert out.double_counted == 0, out
    assert all(r["devices"] == rig.devices for r in rig.records() if "version" in r), rig.records()


def test_broker_sigkill_mid_round_and_restart(rig_factory: Any) -> None:
    rig = rig_factory()
    rig.start_all()
    rig.wait_versions(2, 90)

    rig.broker.kill()
    time.sleep(1.0)
    rig.broker.restart()
    seconds = rig.wait_versions(rig.version() + 2, 90)

    assert_clean(rig)
    assert seconds < 60


def test_broker_sigterm_and_restart(rig_factory: Any) -> None:
    rig = rig_factory()
    rig.start_all()
    rig.wait_versions(2, 90)

    rig.broker.stop()
    time.sleep(1.0)
    rig.broker.restart()
    rig.wait_versions(rig.version() + 2, 90)

    assert_clean(rig)


@pytest.mark.parametrize("point", ["before_journal", "after_journal"])
def test_aggregator_sigkill_around_the_durable_record(rig_factory: Any, point: str) -> None:
    # before_journal: the update was received but not recorded (and not acked);
    # after_journal: recorded but not yet acknowledged to the broker.
    rig = rig_factory()
    rig.start_aggregator(crash_at=point)
    for i in range(rig.devices):
        rig.start_agent(i)
    assert rig.aggregator.wait(90) == -9, rig.tail("aggregator.log")

    rig.start_aggregator()
    rig.wait_versions(2, 90)

    assert_clean(rig)
    first = rig.records()[0]
    assert first["round"] == 1  # the round in flight at the crash completed, not abandoned
