"""FedProx (Li et al., MLSys 2020): FedAvg aggregation; the round task carries ``prox_mu``
and each device adds ``mu/2 * ||w - w_global||^2`` to its local loss, which keeps devices that
train longer (or on skewed data) from drifting far from the global model."""

from __future__ import annotations

import dataclasses
from typing import Any

from aggregator.strategies.options import opt
from aggregator.strategies.streaming import StreamingOptions, StreamingStrategy
from fedge.errors import InvalidValue

__all__ = ["FedProx", "FedProxOptions"]


@dataclasses.dataclass(frozen=True)
class FedProxOptions(StreamingOptions):
    mu: float = opt(0.01, "proximal term weight sent to devices as prox_mu (paper: 0.001-1)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.mu < 1e6:
            raise InvalidValue(f"mu must be in [0, 1e6), got {self.mu}")


class FedProx(StreamingStrategy):
    name = "fedprox"
    summary = "FedAvg + a proximal term mu on devices (Li et al. 2020)"
    Options = FedProxOptions
    options: FedProxOptions

    def hyper_overrides(self) -> dict[str, Any]:
        return {"prox_mu": self.options.mu}
