"""The state of the round in progress."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedge.envelopes import RoundTask

__all__ = ["OpenRound"]


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

    @property
    def round(self) -> int:
        return self.task.round

    def account(self, num_samples: int, metrics: Mapping[str, float], epochs_asked: int) -> None:
        """Add a counted update's sample count and reported training metrics."""
        self.samples += num_samples
        self.train_loss_sum += metrics.get("loss", 0.0) * num_samples
        epochs = metrics.get("epochs")
        if epochs is not None:
            self.epochs_sum += epochs
            self.epochs_reported += 1
            self.early_stopped += epochs < epochs_asked

    def record(self) -> dict[str, Any]:
        """The round's part of its metrics line (docs/operations.md)."""
        out: dict[str, Any] = {
            "devices": len(self.folded),
            "staleness_max": max((s for *_, s in self.folded), default=0),
            "train_loss": self.train_loss_sum / max(self.samples, 1),
            "samples": self.samples,
            "uplink_bytes": self.uplink_bytes,
            "task_bytes": self.task_bytes,
            "rejected": dict(self.rejected),
        }
        if self.epochs_reported:
            out["local_epochs_mean"] = self.epochs_sum / self.epochs_reported
            out["early_stopped"] = self.early_stopped
        return out
