"""The soak: a fleet of real processes under random SIGKILLs, then an audit.

Agents run several to a process (``tests/faults/agent_host.py``), so killing a unit is a power
cut of a gateway with its devices. At random gaps one target is SIGKILLed and restarted: an
agent unit (after 0.2-2 s), the aggregator (after 0.2-1.5 s; only in the first part of the
run, so that its last life is long enough to watch its memory) or the broker (after 1 s).
Then the chaos stops, the fleet must complete more rounds, and the outcome is audited
(``tests/faults/audit.py``). The aggregator's and the broker's RSS are sampled from
``/proc/PID/status`` twice a second.

``tests/faults/test_soak.py`` runs a bounded version; ``bench/soak/run.py`` the long one.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.faults.audit import Outcome, recoveries, rounds_hit
from tests.faults.rig import FaultRig, rss_kb

__all__ = ["SoakPlan", "SoakResult", "run_soak"]


@dataclass(frozen=True)
class SoakPlan:
    devices: int = 12
    agents_per_process: int = 4
    seconds: float = 40.0  # chaos phase
    gap: tuple[float, float] = (2.0, 5.0)  # seconds between two faults
    weights: tuple[tuple[str, int], ...] = (("agent", 3), ("aggregator", 1), ("broker", 1))
    aggregator_until: float = 0.5  # fraction of the chaos phase with aggregator kills
    round_timeout: float = 20.0
    min_devices: int | None = None  # default: half the fleet
    drain_versions: int = 2  # rounds to complete after the chaos
    seed: int = 0

    def rig_kwargs(self) -> dict[str, Any]:
        """What ``FaultRig`` needs to carry this plan."""
        return {
            "devices": self.devices,
            "agents_per_process": self.agents_per_process,
            "round_timeout": self.round_timeout,
            "min_devices": self.min_devices or max(1, self.devices // 2),
        }


@dataclass
class SoakResult:
    plan: SoakPlan
    outcome: Outcome
    faults: Counter[str]
    recoveries: list[float]
    final_version: int
    wall_seconds: float
    agg_rss: list[tuple[float, int, int]] = field(default_factory=list)  # (t, pid, kB)
    broker_rss: list[tuple[float, int]] = field(default_factory=list)  # (t, kB)
    unaudited_versions: int = 0  # checkpointed, but no metrics line (killed in between)
    broker_kill_rounds: set[int] = field(default_factory=set)  # rounds with a broker SIGKILL

    @property
    def lost_in_broker_kill_rounds(self) -> bool:
        """Every lost update belongs to a round during which the broker was SIGKILLed: the
        known window of tests/faults/test_inflight.py, not another cause."""
        return set(self.outcome.lost_rounds) <= self.broker_kill_rounds

    def rss_growth_kb(self, versions_ts: list[float]) -> tuple[int, int, int] | None:
        """(first-quarter median, last-quarter median, versions in between) of the aggregator's
        last life, counted from its first completed round (warm-up excluded)."""
        if not self.agg_rss:
            return None
        pid = self.agg_rss[-1][1]
        life = [(t, kb) for t, p, kb in self.agg_rss if p == pid]
        start = next((v for v in versions_ts if v >= life[0][0]), None)
        if start is None:
            return None
        window = [(t, kb) for t, kb in life if t >= start]
        if len(window) < 8:
            return None
        q = len(window) // 4
        first = int(statistics.median(kb for _, kb in window[:q]))
        last = int(statistics.median(kb for _, kb in window[-q:]))
        spanned = sum(1 for v in versions_ts if window[0][0] <= v <= window[-1][0])
        return first, last, spanned

    def row(self, versions_ts: list[float]) -> dict[str, Any]:
        """The figures of the run (outcome, faults, recovery, memory), for a report."""
        growth = self.rss_growth_kb(versions_ts)
        finite = [r for r in self.recoveries if r != float("inf")]
        return {
            **self.outcome.as_row(),
            "faults": dict(self.faults),
            "recovery_max": round(max(finite), 2) if finite else None,
            "recovery_median": round(statistics.median(finite), 2) if finite else None,
            "never_recovered": len(self.recoveries) - len(finite),
            "unaudited_versions": self.unaudited_versions,
            "lost_all_in_broker_kill_rounds": self.lost_in_broker_kill_rounds,
            "wall_seconds": round(self.wall_seconds, 1),
            "agg_rss_kb": None if growth is None else {"first": growth[0], "last": growth[1]},
            "agg_rss_versions": None if growth is None else growth[2],
            "broker_rss_kb_max": max((kb for _, kb in self.broker_rss), default=None),
        }


class _Sampler(threading.Thread):
    def __init__(self, rig: FaultRig, out: SoakResult) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.rig, self.out = rig, out
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.5):
            t = time.time()
            agg = self.rig.aggregator
            if agg is not None and agg.poll() is None:
                kb = rss_kb(agg.pid)
                if kb is not None:
                    self.out.agg_rss.append((t, agg.pid, kb))
            pid = self.rig.broker.pid
            kb = rss_kb(pid) if pid is not None else None
            if kb is not None:
                self.out.broker_rss.append((t, kb))


def _pick(rng: random.Random, plan: SoakPlan, aggregator_ok: bool) -> str:
    choices = [(k, w) for k, w in plan.weights if w > 0 and (k != "aggregator" or aggregator_ok)]
    return rng.choices([k for k, _ in choices], [w for _, w in choices])[0]


def run_soak(
    rig: FaultRig, plan: SoakPlan, say: Callable[[str], None] = lambda _s: None
) -> SoakResult:
    """Run ``plan`` on a rig made with ``FaultRig(..., **plan.rig_kwargs())``."""
    rng = random.Random(plan.seed)
    t0 = time.monotonic()
    result = SoakResult(plan, Outcome(0, 0, 0, 0, 0, 0), Counter(), [], 0, 0.0)
    sampler = _Sampler(rig, result)
    sampler.start()
    try:
        rig.start_all()
        rig.wait_versions(1, 180)
        say(f"fleet up in {time.monotonic() - t0:.1f} s; chaos for {plan.seconds:.0f} s")
        chaos_end = time.monotonic() + plan.seconds
        agg_end = time.monotonic() + plan.seconds * plan.aggregator_until
        while time.monotonic() < chaos_end:
            time.sleep(rng.uniform(*plan.gap))
            target = _pick(rng, plan, time.monotonic() < agg_end)
            result.faults[target] += 1
            if target == "agent":
                unit = rng.randrange(len(rig.units))
                rig.kill_agent(unit)
                time.sleep(rng.uniform(0.2, 2.0))
                rig.start_agent(unit)
                say(f"  SIGKILL agent unit {unit} (devices {rig.units[unit]}), restarted")
            elif target == "aggregator":
                rig.kill_aggregator()
                time.sleep(rng.uniform(0.2, 1.5))
                rig.start_aggregator()
                say("  SIGKILL aggregator, restarted")
            else:
                rig.broker.kill()
                time.sleep(1.0)
                rig.broker.restart()
                say("  SIGKILL broker, restarted after 1 s")
        v = rig.version()
        say(f"chaos over at version {v}; draining {plan.drain_versions} more rounds")
        rig.wait_versions(v + plan.drain_versions, 4 * plan.round_timeout + 120)
    finally:
        sampler.halt.set()
        sampler.join(5)
    # The fleet keeps running: read the checkpoint first, so every version up to it has had
    # the time to get its metrics line unless the aggregator was killed in between.
    result.final_version = rig.version()
    records = rig.records()
    audited = {r["version"] for r in records if "version" in r}
    result.unaudited_versions = len(set(range(1, result.final_version + 1)) - audited)
    result.outcome = rig.outcome()
    result.recoveries = recoveries(rig.events, records)
    result.broker_kill_rounds = rounds_hit(rig.events, records, "broker SIGKILL")
    result.wall_seconds = time.monotonic() - t0
    return result
