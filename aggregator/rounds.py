"""The state of the round in progress, and what the intake needs to take updates into it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedge.envelopes import RoundTask
from fedge.tensors import TensorSpec

__all__ = ["FoldSink", "OpenRound", "RoundContext"]


@dataclass
class OpenRound:
    task: RoundTask
    opened_at: float
    counted: dict[str, str] = field(default_factory=dict)  # device -> update_id
    uplink_bytes: int = 0
    train_loss_sum: float = 0.0
    samples: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    task_bytes: int = 0
    epochs_sum: float = 0.0  # local epochs devices report having run (early stopping)
    epochs_reported: int = 0
    early_stopped: int = 0
    # What went into the version this round builds: (device, round answered, update id,
    # staleness); in async mode updates to older, still-accepted rounds too.
    folded: list[tuple[str, int, str, int]] = field(default_factory=list)
    calib: Any = None  # aggregator.calibration.RangeMerger when the int8 twin is built
    weights: list[int] = field(default_factory=list)  # each folded update's weight (capped)
    # Re-opened by a restarted service: opened_at is then the task's issue time, and
    # uplink_bytes counts the journaled updates replayed (docs/operations.md, restarts).
    resumed: bool = False

    @property
    def round(self) -> int:
        return self.task.round

    def account(
        self,
        num_samples: int,
        metrics: Mapping[str, float],
        epochs_asked: int,
        *,
        weight: int | None = None,
    ) -> None:
        """Add a counted update's sample count (as reported, clamped), its weight and its
        reported training metrics."""
        self.samples += num_samples
        self.weights.append(num_samples if weight is None else weight)
        self.train_loss_sum += metrics.get("loss", 0.0) * num_samples
        epochs = metrics.get("epochs")
        if epochs is not None:
            self.epochs_sum += epochs
            self.epochs_reported += 1
            self.early_stopped += epochs < epochs_asked

    def record(self) -> dict[str, Any]:
        """The round's part of its metrics line (docs/operations.md)."""
        stale = [s for *_, s in self.folded]
        out: dict[str, Any] = {
            "devices": len(self.folded),
            "staleness_max": max(stale, default=0),
            "staleness_mean": sum(stale) / len(stale) if stale else 0.0,
            "train_loss": self.train_loss_sum / max(self.samples, 1),
            "samples": self.samples,
            "uplink_bytes": self.uplink_bytes,
            "task_bytes": self.task_bytes,
            "rejected": dict(self.rejected),
        }
        if self.resumed:
            out["resumed"] = True
        if self.epochs_reported:
            out["local_epochs_mean"] = self.epochs_sum / self.epochs_reported
            out["early_stopped"] = self.early_stopped
        return out


class FoldSink(Protocol):
    """What a validated delta is folded into: the strategy (service) or a shard worker's
    clipped weighted sum. Raises ``AggregationError`` to refuse it, changing nothing."""

    def fold(
        self, delta: Mapping[str, np.ndarray], num_samples: int, *, staleness: int = 0
    ) -> None: ...


@dataclass(frozen=True)
class RoundContext:
    """One round as the intake sees it, made once when the round starts.

    ``building`` is the round whose version the updates go into; ``window`` the rounds still
    accepted by id (asynchronous mode: the open one and older ones within ``max_staleness``;
    None: only ``building``). ``version`` is the model version the round's updates are folded
    into (staleness = version - base version of the round answered); ``spec`` its tensors.
    """

    building: OpenRound
    version: int
    spec: TensorSpec
    sink: FoldSink
    window: Mapping[int, OpenRound] | None = None
    # The most an update may weigh in this round (aggregator.weighting); None: only the
    # intake's absolute clamp.
    max_weight: int | None = None

    def answered(self, round_id: int) -> OpenRound | None:
        """The accepted round an update names, None if it is not (or no longer) accepted."""
        if self.window is None:
            return self.building
        return self.window.get(round_id)

    def staleness(self, answered: OpenRound) -> int:
        return self.version - answered.task.base_version
