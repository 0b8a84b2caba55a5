"""Learning rates driven by the central validation metric: reduce on plateau.

One :class:`ReduceOnPlateau` drives the server learning rate (``strategy.server_lr``) and
another the devices' learning rate (``TrainHyper.lr`` in the round task); each is stepped once
per published version with the central metric (accuracy: ``mode="max"``; loss: ``"min"``).
The rule is PyTorch's ``ReduceLROnPlateau``:

- a metric better than ``best`` by more than ``threshold * |best|`` resets the bad-round count;
  anything else (a NaN included) is a bad round;
- after more than ``patience`` bad rounds in a row, ``value <- max(value * factor, min_value)``,
  then ``cooldown`` rounds in which bad rounds are not counted.

Pure and checkpointable: ``state_dict()`` is a flat dict of numbers for the aggregator's
atomic checkpoint, and ``load_state_dict`` restores it exactly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from fedge.envelopes import TrainHyper

__all__ = ["PlateauConfig", "ReduceOnPlateau", "with_client_lr"]


@dataclasses.dataclass(frozen=True)
class PlateauConfig:
    mode: str = "max"
    factor: float = 0.5
    patience: int = 3
    threshold: float = 1e-4
    cooldown: int = 0
    min_value: float = 1e-5

    def __post_init__(self) -> None:
        if self.mode not in ("max", "min"):
            raise ValueError(f"mode must be max (accuracy) or min (loss), got {self.mode!r}")
        if not 0 < self.factor < 1:
            raise ValueError(f"factor must be in (0, 1), got {self.factor}")
        if self.patience < 0 or self.cooldown < 0:
            raise ValueError("patience and cooldown must be >= 0")
        if not 0 <= self.threshold < math.inf:
            raise ValueError(f"threshold must be >= 0, got {self.threshold}")
        if not 0 < self.min_value < math.inf:
            raise ValueError(f"min_value must be > 0, got {self.min_value}")


class ReduceOnPlateau:
    def __init__(self, initial: float, config: PlateauConfig | None = None) -> None:
        self.config = config or PlateauConfig()
        if not 0 < initial < math.inf:
            raise ValueError(f"initial value must be > 0, got {initial}")
        self.value = float(initial)
        self.best = -math.inf if self.config.mode == "max" else math.inf
        self.bad_rounds = 0
        self.cooldown_left = 0
        self.reductions = 0

    def _better(self, metric: float) -> bool:
        if math.isnan(metric):
            return False
        margin = self.config.threshold * abs(self.best) if math.isfinite(self.best) else 0.0
        if self.config.mode == "max":
            return metric > self.best + margin
        return metric < self.best - margin

    def step(self, metric: float) -> bool:
        """Feed one round's metric; True if the value was reduced by this step."""
        metric = float(metric)
        if self._better(metric):
            self.best, self.bad_rounds = metric, 0
        else:
            self.bad_rounds += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.bad_rounds = 0
        if self.bad_rounds > self.config.patience:
            new = max(self.value * self.config.factor, self.config.min_value)
            self.bad_rounds = 0
            if new < self.value:
                self.value = new
                self.cooldown_left = self.config.cooldown
                self.reductions += 1
                return True
        return False

    def state_dict(self) -> dict[str, float | int]:
        return {
            "value": self.value,
            "best": self.best,
            "bad_rounds": self.bad_rounds,
            "cooldown_left": self.cooldown_left,
            "reductions": self.reductions,
        }

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        try:
            value, best = float(d["value"]), float(d["best"])
            counts = [int(d[k]) for k in ("bad_rounds", "cooldown_left", "reductions")]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"schedule state is incomplete or malformed: {e}") from None
        if not 0 < value < math.inf or math.isnan(best) or min(counts) < 0:
            raise ValueError(f"schedule state out of range: {dict(d)}")
        self.value, self.best = value, best
        self.bad_rounds, self.cooldown_left, self.reductions = counts


def with_client_lr(hyper: TrainHyper, schedule: ReduceOnPlateau) -> TrainHyper:
    """The round's hyper-parameters with the scheduled device learning rate."""
    return dataclasses.replace(hyper, lr=schedule.value)
