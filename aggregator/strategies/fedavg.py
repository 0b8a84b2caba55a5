"""FedAvg (McMahan et al. 2017): the sample-weighted mean of deltas, n_i / n, applied with a
server learning rate (1.0 is plain FedAvg)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from aggregator.accumulator import WeightedSum
from aggregator.strategies.base import Strategy
from fedge.errors import AggregationError
from fedge.tensors import TensorSpec

__all__ = ["FedAvg"]


class FedAvg(Strategy):
    name = "fedavg"

    def __init__(self, server_lr: float = 1.0) -> None:
        self.server_lr = server_lr
        self._acc: WeightedSum | None = None

    def begin_round(self, spec: TensorSpec) -> None:
        self._acc = WeightedSum(spec)

    def fold(self, delta: Mapping[str, np.ndarray], num_samples: int) -> None:
        if self._acc is None:
            raise AggregationError("fold() before begin_round()")
        self._acc.add(delta, float(num_samples))

    @property
    def count(self) -> int:
        return 0 if self._acc is None else self._acc.count

    def finish(self, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._acc is None:
            raise AggregationError("finish() before begin_round()")
        mean = self._acc.mean()
        with np.errstate(over="ignore", invalid="ignore"):
            return {
                k: (w + self.server_lr * mean[k]).astype(np.float32) for k, w in weights.items()
            }
