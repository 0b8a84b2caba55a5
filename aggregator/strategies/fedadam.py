"""FedAdam (Reddi et al. 2021): Adam's second moment on the server, see ``fedopt``."""

from __future__ import annotations

import dataclasses

import numpy as np

from aggregator.strategies.fedopt import FedOpt, FedOptOptions
from aggregator.strategies.options import opt
from fedge.errors import InvalidValue

__all__ = ["FedAdam", "FedAdamOptions"]


@dataclasses.dataclass(frozen=True)
class FedAdamOptions(FedOptOptions):
    beta2: float = opt(0.99, "second-moment decay in [0, 1)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.beta2 < 1:
            raise InvalidValue(f"beta2 must be in [0, 1), got {self.beta2}")


class FedAdam(FedOpt):
    name = "fedadam"
    summary = "server Adam on the mean delta (Reddi et al. 2021)"
    Options = FedAdamOptions
    options: FedAdamOptions

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        b2 = np.float32(self.options.beta2)
        return b2 * v + (np.float32(1) - b2) * d2
