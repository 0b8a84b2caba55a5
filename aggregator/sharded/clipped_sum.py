"""A shard worker's share of a round: updates folded into a float64 sum, each bounded by
``clip_norm`` as the strategies' ``fold`` bounds it."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from aggregator.strategies.accumulator import WeightedSum, squared_norm
from fedge.tensors import TensorSpec

__all__ = ["ClippedSum"]


class ClippedSum:
    """A worker's share of a round: a float64 ``WeightedSum`` of updates whose norm is bounded
    by ``clip_norm`` as the strategies' ``fold`` bounds it (0: unbounded). A ``FoldSink``."""

    def __init__(self, spec: TensorSpec, clip_norm: float) -> None:
        self.acc = WeightedSum(spec)
        self.clip_norm = clip_norm

    def fold(
        self, delta: Mapping[str, np.ndarray], num_samples: int, *, staleness: int = 0
    ) -> None:
        scale = 1.0
        if self.clip_norm > 0:
            norm = squared_norm(delta) ** 0.5
            scale = min(1.0, self.clip_norm / norm) if norm > 0 else 1.0
        self.acc.add(delta, num_samples, scale=scale)
