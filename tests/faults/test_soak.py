"""A bounded soak for CI: random SIGKILLs of agents, the aggregator and the broker for 40 s.

The long run (50 devices, minutes) is ``bench/soak/run.py``. ``FEDGE_SOAK_SEED`` picks another
fault schedule."""

from __future__ import annotations

import os
from typing import Any

import pytest

from tests.faults.soak import SoakPlan, run_soak

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]


def test_bounded_soak(rig_factory: Any) -> None:
    # Prepare: 12 devices in 3 processes of 4, quorum 6, 40 s of faults every 2-5 s.
    plan = SoakPlan(
        devices=12, agents_per_process=4, seconds=40, seed=int(os.environ.get("FEDGE_SOAK_SEED", 0))
    )
    rig = rig_factory(**plan.rig_kwargs())

    # Execute
    res = run_soak(rig, plan)

    # Assert: nothing lost or counted twice; the fleet made progress after every fault; the
    # aggregator's memory stayed flat over its last life.
    versions_ts = sorted(r["ts"] for r in rig.records() if "version" in r)
    row = res.row(versions_ts)
    rig.notes.update({k: v for k, v in row.items() if k not in res.outcome.as_row()})
    out = res.outcome
    if out.lost and res.lost_in_broker_kill_rounds:
        pytest.xfail(
            f"BUG (test_inflight.py): {out.lost} acked updates lost, all in rounds "
            f"{list(out.lost_rounds)} during which the broker was SIGKILLed; {row}"
        )
    assert out.lost == 0, row
    assert out.double_counted == 0, row
    assert res.faults.total() >= 6, row
    assert row["never_recovered"] == 0, row
    assert out.versions >= 5, row
    growth = res.rss_growth_kb(versions_ts)
    assert growth is not None, row
    first, last, spanned = growth
    assert spanned >= 3, row
    assert last - first < 16 * 1024, row  # flat: < 16 MB over its last life
