"""A streaming weighted sum: memory O(model), whatever the number of updates folded."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedge.errors import AggregationError
from fedge.tensors import TensorSpec

__all__ = ["WeightedSum"]


class WeightedSum:
    """Accumulates ``sum_i w_i * delta_i`` and ``sum_i w_i`` in float64."""

    def __init__(self, spec: TensorSpec) -> None:
        self.spec = dict(spec)
        self.sums = {k: np.zeros(s, dtype=np.float64) for k, s in spec.items()}
        self.total_weight = 0.0
        self.count = 0

    def add(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        if not weight > 0:
            raise AggregationError(f"update weight must be > 0, got {weight}")
        for k, acc in self.sums.items():
            acc += np.asarray(delta[k], dtype=np.float64) * weight
        self.total_weight += weight
        self.count += 1

    def mean(self) -> dict[str, np.ndarray]:
        if self.count == 0:
            raise AggregationError("no updates to average")
        # Overflow to inf in the float32 cast is caught by the caller's finiteness check.
        with np.errstate(over="ignore"):
            return {k: (v / self.total_weight).astype(np.float32) for k, v in self.sums.items()}
