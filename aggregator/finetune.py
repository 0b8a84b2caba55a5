"""Fine-tuning chosen tensors (``model.trainable``) on the aggregator's side.

The patterns are resolved once against the model at start (a pattern that matches nothing
is a ``ConfigError`` then, not a silently frozen model); every task carries the names
(``RoundTask.trainable``). Updates are read against those tensors only
(``aggregator/validation.py``), the frozen ones fold as zeros, and after the strategy's step
``hold`` puts the frozen tensors back bit for bit and zeroes the strategy's per-weight state
for them, so no server optimizer (momentum, Adam moments, DP noise) moves them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from aggregator.strategies.base import Strategy
from fedge.errors import ConfigError, InvalidValue
from fedge.trainable import frozen, resolve

__all__ = ["FineTune"]


class FineTune:
    """The trainable tensors of this fleet's rounds; ``names`` None: full training."""

    def __init__(self, names: tuple[str, ...] | None) -> None:
        self.names = names

    @classmethod
    def bind(cls, patterns: Sequence[str] | None, weights: Mapping[str, np.ndarray]) -> FineTune:
        if patterns is None:
            return cls(None)
        try:
            names = resolve(patterns, weights)
        except InvalidValue as e:
            raise ConfigError(f"model.trainable: {e}") from None
        return cls(names)

    def hold(
        self,
        old: Mapping[str, np.ndarray],
        new: dict[str, np.ndarray],
        strategy: Strategy,
        trainable: Sequence[str] | None,
    ) -> dict[str, np.ndarray]:
        """``new`` with the tensors the closed round's task froze (``trainable``: its
        ``RoundTask.trainable``) exactly as in ``old``."""
        if trainable is None:
            return new
        still = set(frozen(trainable, {k: v.shape for k, v in old.items()}))
        strategy.drop_state({k: np.zeros(old[k].shape, dtype=bool) for k in still})
        return {k: (old[k].copy() if k in still else v) for k, v in new.items()}
