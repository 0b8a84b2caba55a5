"""FedYogi (Reddi et al. 2021): Yogi's additive second moment, which grows or shrinks ``v``
by at most ``(1 - beta2) * d^2`` per round, so one large round cannot freeze the step size."""

from __future__ import annotations

import numpy as np

from aggregator.strategies.fedadam import FedAdamOptions
from aggregator.strategies.fedopt import FedOpt

__all__ = ["FedYogi"]


class FedYogi(FedOpt):
    name = "fedyogi"
    summary = "server Yogi on the mean delta (Reddi et al. 2021)"
    Options = FedAdamOptions
    options: FedAdamOptions

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        b2 = np.float32(self.options.beta2)
        return v - (np.float32(1) - b2) * d2 * np.sign(v - d2)
