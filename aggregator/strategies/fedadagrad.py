"""FedAdagrad (Reddi et al. 2021): ``v`` sums every round's squared mean delta."""

from __future__ import annotations

import numpy as np

from aggregator.strategies.fedopt import FedOpt

__all__ = ["FedAdagrad"]


class FedAdagrad(FedOpt):
    name = "fedadagrad"
    summary = "server Adagrad on the mean delta (Reddi et al. 2021)"

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        return v + d2
