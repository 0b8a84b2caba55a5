"""Coordinate-wise median of the deltas (Yin et al., ICML 2018): each coordinate of the step is
the median of that coordinate over the round's updates, so fewer than half of the devices can
not move it outside the range of the honest values. Memory O(updates x model)."""

from __future__ import annotations

import numpy as np

from aggregator.strategies.buffered import BufferedStrategy

__all__ = ["Median"]


class Median(BufferedStrategy):
    name = "median"
    summary = "coordinate-wise median (Yin et al. 2018); buffers all updates"

    def _combine(self, rows: list[np.ndarray]) -> np.ndarray:
        out = np.empty(self._size, np.float32)
        for cols, slab in self._slabs(rows):
            out[cols] = np.median(slab, axis=0)
        return out
