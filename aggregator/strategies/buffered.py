"""Robust strategies that need every update of a round at once.

They keep one float32 copy of each update (after norm bounding and staleness weighting):
memory O(updates x model), e.g. 1,000 devices x 1 M parameters = 4 GB. Bound
``target_devices`` (or FedBuff's K) accordingly. The rules are unweighted: a Byzantine device
can claim any ``num_samples``, so sample counts must not buy influence.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Iterator, Mapping

import numpy as np

from aggregator.strategies.base import Strategy
from aggregator.strategies.options import StrategyOptions
from fedge.errors import AggregationError

__all__ = ["BufferedStrategy"]

# A slab (updates x columns) is what median/partition copy at once: bounded in bytes, so
# the peak stays near the buffer itself (measured: 1,000 x 100 k updates, 400 MB buffered).
_SLAB_BYTES = 16 << 20


class BufferedStrategy(Strategy):
    needs_all_updates = True
    dense_updates = True

    def __init__(self, options: StrategyOptions | None = None) -> None:
        super().__init__(options)
        self._rows: list[np.ndarray] = []
        self._size = 0

    def _begin(self, spec: dict[str, tuple[int, ...]]) -> None:
        self._rows = []
        self._size = sum(math.prod(s) for s in spec.values())

    def _fold(self, delta: Mapping[str, np.ndarray], weight: float, scale: float) -> None:
        assert self._spec is not None
        row = np.empty(self._size, np.float32)
        off = 0
        with np.errstate(over="ignore", invalid="ignore"):
            for k, s in self._spec.items():
                n = math.prod(s)
                np.multiply(np.reshape(delta[k], -1), np.float32(scale), out=row[off : off + n])
                off += n
        if not np.isfinite(row).all():
            raise AggregationError("update is not finite (NaN, Inf or overflow)")
        self._rows.append(row)

    @property
    def count(self) -> int:
        return len(self._rows)

    def _aggregate(self) -> Mapping[str, np.ndarray]:
        flat = self._combine(self._rows)
        assert self._spec is not None
        out, off = {}, 0
        for k, s in self._spec.items():
            n = math.prod(s)
            out[k] = flat[off : off + n].reshape(s)
            off += n
        return out

    @abstractmethod
    def _combine(self, rows: list[np.ndarray]) -> np.ndarray:
        """One flat float32 vector from the round's flat updates."""

    def _slabs(self, rows: list[np.ndarray]) -> Iterator[tuple[slice, np.ndarray]]:
        """``(columns, updates x columns array)`` in slabs of at most ``_SLAB_BYTES``."""
        width = max(256, _SLAB_BYTES // (4 * max(len(rows), 1)))
        for a in range(0, self._size, width):
            cols = slice(a, min(a + width, self._size))
            yield cols, np.stack([r[cols] for r in rows])
