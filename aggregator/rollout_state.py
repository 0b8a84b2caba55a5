"""What the rollout controller keeps across restarts (``STATE_DIR/rollout.json``, written
atomically after every change and before the manifest it describes is published), and the
pooled stage decision as a pure function.

    seq         the last manifest sequence number used (manifests only go up)
    manifest    the signed manifest published now (hex of its bytes), re-published at every
                (re)connect
    active      the rollout in progress: version, sha256, previous (+ sha256), stages, stage,
                max_regression, min_devices, first_seq (seq of its stage 0), times
    reports     device -> its shadow report (``ShadowReport.to_map``) of the active candidate
    good        (version, sha256) every device serves once a rollout is promoted; what the
                next rollout's ``previous`` is
    devices     every device that ever announced itself: a stage's cohort is drawn from
                these, so an offline canary is still waited for after a restart (its
                retained status was cleared when it went offline)
    outcome     running | promoted | rolled_back | aborted | released (a direct release)
    history     every step: started, advanced, promoted, rolled_back, aborted, released
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedge.envelopes import ReleaseManifest, ShadowReport
from fedge.errors import ProtocolError
from fedge.limits import DEFAULT_LIMITS
from fedge.support.fsutil import atomic_write

__all__ = ["Active", "Decision", "RolloutState", "decide", "status_of"]

_HISTORY = 500


@dataclass
class Active:
    version: int
    sha256: str
    previous: int | None
    previous_sha256: str
    stages: tuple[float, ...]
    max_regression: float
    min_devices: int
    first_seq: int
    stage: int = 0
    started: float = 0.0
    stage_started: float = 0.0

    def to_map(self) -> dict[str, Any]:
        return {**self.__dict__, "stages": list(self.stages)}

    @classmethod
    def from_map(cls, raw: dict[str, Any]) -> Active:
        return cls(**{**raw, "stages": tuple(raw["stages"])})


@dataclass
class RolloutState:
    path: Path
    seq: int = 0
    manifest: bytes = b""
    active: Active | None = None
    reports: dict[str, ShadowReport] = field(default_factory=dict)
    good: tuple[int, str] | None = None
    devices: set[str] = field(default_factory=set)
    outcome: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> RolloutState:
        st = cls(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return st
        st.seq = int(raw["seq"])
        st.manifest = bytes.fromhex(raw.get("manifest") or "")
        st.active = Active.from_map(raw["active"]) if raw.get("active") else None
        for device, r in (raw.get("reports") or {}).items():
            try:
                st.reports[device] = ShadowReport.read(r, DEFAULT_LIMITS)
            except ProtocolError:
                continue
        st.good = tuple(raw["good"]) if raw.get("good") else None  # type: ignore[assignment]
        st.devices = set(raw.get("devices") or [])
        st.outcome = raw.get("outcome")
        st.history = list(raw.get("history") or [])
        return st

    def log(self, event: dict[str, Any]) -> None:
        self.history = [*self.history[-_HISTORY + 1 :], event]

    def save(self) -> None:
        raw = {
            "seq": self.seq,
            "manifest": self.manifest.hex(),
            "active": self.active.to_map() if self.active else None,
            "reports": {d: r.to_map() for d, r in sorted(self.reports.items())},
            "good": list(self.good) if self.good else None,
            "devices": sorted(self.devices),
            "outcome": self.outcome,
            "history": self.history,
        }
        atomic_write(self.path, json.dumps(raw, indent=1, sort_keys=True).encode())


@dataclass(frozen=True)
class Decision:
    """``wait``, ``advance`` or ``rollback``, why, and the numbers it was taken on."""

    action: str
    reason: str
    reports: int = 0
    required: int = 0
    regression_pp: float = 0.0


def decide(
    reports: dict[str, ShadowReport],
    cohort: set[str],
    new_members: set[str],
    *,
    min_devices: int,
    max_regression: float,
) -> Decision:
    """The stage decision. A candidate that a device of the cohort could not verify or load
    rolls back at once. Otherwise the stage waits for reports from ``min(min_devices,
    |new_members|)`` of the known devices new in this stage's cohort (an offline canary is
    waited for: ``fedge rollout promote`` moves on without it), then compares
    accuracy pooled over every cohort report with a baseline: sum(n * (base - acc)) / sum(n)
    in points; above ``max_regression`` it rolls back, else it advances."""
    mine = {d: r for d, r in reports.items() if d in cohort}
    for d, r in sorted(mine.items()):
        if r.error:
            return Decision("rollback", f"{d}: {r.error}", len(mine))
    required = min(min_devices, len(new_members))
    fresh = sum(1 for d in mine if d in new_members)
    if fresh < required:
        return Decision("wait", f"{fresh} of {required} reports", len(mine), required)
    based = [r for r in mine.values() if r.baseline is not None and r.samples > 0]
    n = sum(r.samples for r in based)
    pooled = 100.0 * sum(r.samples * (r.base_accuracy - r.accuracy) for r in based) / n if n else 0
    if pooled > max_regression:
        why = f"pooled regression {pooled:.2f} pp > {max_regression} pp over {len(based)} devices"
        return Decision("rollback", why, len(mine), required, pooled)
    why = f"{len(mine)} reports, pooled regression {pooled:.2f} pp <= {max_regression} pp"
    return Decision("advance", why, len(mine), required, pooled)


def status_of(state: RolloutState) -> dict[str, Any]:
    """What ``fedge rollout status`` prints (also readable without the aggregator running)."""
    m = ReleaseManifest.from_bytes(state.manifest) if state.manifest else None
    return {
        "outcome": state.outcome,
        "seq": state.seq,
        "serving": state.good[0] if state.good else None,
        "manifest": None
        if m is None
        else {
            "version": m.version,
            "previous": m.previous,
            "stage": m.stage,
            "fraction": m.fraction,
            "mode": str(m.mode),
        },
        "active": state.active.to_map() if state.active else None,
        "reports": {d: r.to_map() for d, r in sorted(state.reports.items())},
        "history": state.history[-20:],
    }
