"""Coordinate-wise trimmed mean (Yin et al., ICML 2018): per coordinate, drop the
``floor(beta * n)`` largest and smallest values of the n updates and average the rest.
Memory O(updates x model)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from aggregator.strategies.buffered import BufferedStrategy
from aggregator.strategies.options import StrategyOptions, opt
from fedge.errors import AggregationError, InvalidValue

__all__ = ["TrimmedMean", "TrimmedMeanOptions"]


@dataclasses.dataclass(frozen=True)
class TrimmedMeanOptions(StrategyOptions):
    beta: float = opt(0.1, "fraction trimmed from each end per coordinate, in [0, 0.5)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.beta < 0.5:
            raise InvalidValue(f"beta must be in [0, 0.5), got {self.beta}")


class TrimmedMean(BufferedStrategy):
    name = "trimmed_mean"
    summary = "coordinate-wise beta-trimmed mean (Yin et al. 2018); buffers all updates"
    Options = TrimmedMeanOptions
    options: TrimmedMeanOptions

    def _combine(self, rows: list[np.ndarray]) -> np.ndarray:
        n = len(rows)
        k = math.floor(self.options.beta * n)
        if n - 2 * k < 1:
            raise AggregationError(
                f"trimmed_mean: {n} updates leave none after trimming {k} per end"
            )
        out = np.empty(self._size, np.float32)
        for cols, slab in self._slabs(rows):
            part = np.partition(slab, (k, n - k - 1), axis=0) if k else slab
            out[cols] = part[k : n - k].mean(axis=0, dtype=np.float64)
        return out
