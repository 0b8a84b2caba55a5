"""The outcome of a fault run, computed from what each side wrote, never from what a test hoped.

Inputs: the aggregator's metrics records (one per ended round; a completed round carries
``counted``: device -> update id), the receipts of devices (``(device, round, update id)`` of
every update the broker acknowledged to them), the aggregator's log (explicit rejections) and a
timeline of injected faults. Every acknowledged update of a round that ended is exactly one of:

- counted: its id is in the round's ``counted``;
- superseded: the same device is counted in that round under another id (a resend of the same
  round after a reboot; the aggregator counts a device once per round);
- in a failed round: the round failed with a logged reason, and its updates with it;
- rejected: refused explicitly and logged, e.g. ``wrong_round`` (it arrived after its round
  closed) -- counted in the metrics, never folded;
- lost: none of the above. Must be 0.

Double counting is an update id counted twice, or a device counted twice in one round.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "Event",
    "Outcome",
    "audit",
    "late_rejections",
    "recoveries",
    "recovery_seconds",
    "rounds_hit",
]

# aggregator/validation.py: f"{upd.device}: round {upd.round}, open is {t.round}"
_WRONG_ROUND = re.compile(r"rejected update: wrong_round: ([A-Za-z0-9_.-]+): round (\d+), open")
# aggregator/service.py, between rounds: f"{device}: no round is open" (the round is not named)
_NO_ROUND = re.compile(r"rejected update: no_round: ([A-Za-z0-9_.-]+): no round is open")


@dataclass(frozen=True)
class Event:
    """One entry of a fault timeline: ``kind`` is "fault" or "recover"."""

    t: float  # time.time(), the clock of the metrics records
    kind: str
    what: str


@dataclass(frozen=True)
class Outcome:
    versions: int  # published versions (rounds completed)
    failed_rounds: int
    acked: int  # updates the broker acknowledged to devices, in rounds that ended
    counted: int  # updates the aggregator folded
    lost: int  # acked by the broker, in a round that ended, but never counted nor refused
    double_counted: int  # an update id or (device, round) counted more than once
    recovery_seconds: float | None = None
    rejected: int = 0  # acked, then refused explicitly (logged, counted in metrics)
    in_failed_rounds: int = 0  # acked in a round that failed with a reason
    superseded: int = 0  # acked, the device counted in that round under another update id
    lost_rounds: tuple[int, ...] = ()  # the rounds of the lost updates

    def as_row(self) -> dict[str, Any]:
        return asdict(self)


def audit(
    records: Sequence[dict[str, Any]],
    acked: Iterable[tuple[str, int, str]],
    rejections: Iterable[tuple[str, int | None]] = (),
    recovery: float | None = None,
) -> Outcome:
    """``rejections``: (device, round) refused explicitly; round None when the log does not
    name it (``no_round``), which then covers one such update of that device, its latest."""
    ended = {r["round"] for r in records}
    failed = {r["round"] for r in records if "failed" in r}
    counted = [(d, r["round"], uid) for r in records for d, uid in r.get("counted", {}).items()]
    counted_set = set(counted)
    ids = Counter(uid for _, _, uid in counted)
    pairs = Counter((d, rnd) for d, rnd, _ in counted)
    refused = {r for r in rejections if r[1] is not None}
    unnamed = Counter(d for d, rnd in rejections if rnd is None)
    receipts = {a for a in acked if a[1] in ended}
    superseded = {a for a in receipts if a not in counted_set and (a[0], a[1]) in pairs}
    missing = receipts - counted_set - superseded
    in_failed = {a for a in missing if a[1] in failed}
    rejected = {a for a in missing - in_failed if (a[0], a[1]) in refused}
    for a in sorted(missing - in_failed - rejected, key=lambda a: -a[1]):
        if unnamed[a[0]] > 0:
            unnamed[a[0]] -= 1
            rejected.add(a)
    lost = missing - in_failed - rejected
    return Outcome(
        versions=sum(1 for r in records if "version" in r),
        failed_rounds=len(failed),
        acked=len(receipts),
        counted=len(counted),
        lost=len(lost),
        double_counted=sum(c - 1 for c in ids.values() if c > 1)
        + sum(c - 1 for c in pairs.values() if c > 1),
        recovery_seconds=recovery,
        rejected=len(rejected),
        in_failed_rounds=len(in_failed),
        superseded=len(superseded),
        lost_rounds=tuple(sorted({a[1] for a in lost})),
    )


def late_rejections(log_text: str) -> list[tuple[str, int | None]]:
    """(device, round) of every update the aggregator logged as ``wrong_round``, and
    (device, None) for each it logged as ``no_round``."""
    out: list[tuple[str, int | None]] = [(m[1], int(m[2])) for m in _WRONG_ROUND.finditer(log_text)]
    out += [(m[1], None) for m in _NO_ROUND.finditer(log_text)]
    return out


def rounds_hit(events: Sequence[Event], records: Sequence[dict[str, Any]], what: str) -> set[int]:
    """Rounds during which (from the end of the previous round to its own end) an event whose
    ``what`` contains ``what`` happened."""
    hit = set()
    prev = float("-inf")
    for r in sorted(records, key=lambda r: r["ts"]):
        if any(prev < e.t <= r["ts"] and what in e.what for e in events):
            hit.add(r["round"])
        prev = r["ts"]
    return hit


def recoveries(events: Sequence[Event], records: Sequence[dict[str, Any]]) -> list[float]:
    """For each fault: seconds from the fault to the first version completed after it and after
    the first "recover" event (a restart) that follows it. A fault the run never recovered
    from (no version after it) gives ``inf``."""
    done = sorted(r["ts"] for r in records if "version" in r)
    out = []
    for f in (e for e in events if e.kind == "fault"):
        back = next((e.t for e in events if e.kind == "recover" and e.t >= f.t), f.t)
        nxt = next((t for t in done if t >= back), None)
        out.append(float("inf") if nxt is None else nxt - f.t)
    return out


def recovery_seconds(events: Sequence[Event], records: Sequence[dict[str, Any]]) -> float | None:
    """The worst of ``recoveries``; None without faults or when one never recovered."""
    worst = max(recoveries(events, records), default=None)
    return None if worst is None or worst == float("inf") else worst
