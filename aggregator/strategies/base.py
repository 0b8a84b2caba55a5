"""What a strategy is: it folds validated deltas and turns them into the next global model.

Strategies see arrays and update metadata only, never MQTT (the service does transport).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import numpy as np

from fedge.tensors import TensorSpec

__all__ = ["Strategy"]


class Strategy(ABC):
    name: str = ""

    @abstractmethod
    def begin_round(self, spec: TensorSpec) -> None:
        """Reset per-round state."""

    @abstractmethod
    def fold(self, delta: Mapping[str, np.ndarray], num_samples: int) -> None:
        """Take one validated update into the round."""

    @property
    @abstractmethod
    def count(self) -> int:
        """Updates folded this round."""

    @abstractmethod
    def finish(self, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The next global weights from the current ones and the round's updates."""
