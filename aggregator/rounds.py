"""The state of the round in progress."""

from __future__ import annotations

from dataclasses import dataclass, field

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

    @property
    def round(self) -> int:
        return self.task.round
