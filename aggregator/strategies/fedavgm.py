"""FedAvgM (Hsu et al. 2019): FedAvg with server momentum.

``v <- momentum * v + mean_delta``; ``w <- w + server_lr * v``. The defaults keep the effective
learning rate ``server_lr / (1 - momentum)`` at 1, the plain FedAvg step, as Hsu et al. advise;
momentum then smooths the direction across rounds (it helps most on non-IID fleets).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from aggregator.strategies.base import StateDict, check_state_arrays, state_spec
from aggregator.strategies.options import opt
from aggregator.strategies.streaming import StreamingOptions, StreamingStrategy
from fedge.errors import AggregationError, InvalidValue

__all__ = ["FedAvgM", "FedAvgMOptions"]


@dataclasses.dataclass(frozen=True)
class FedAvgMOptions(StreamingOptions):
    server_lr: float = opt(0.1, "server learning rate (effective rate is server_lr/(1-momentum))")
    momentum: float = opt(0.9, "server momentum in [0, 1)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.momentum < 1:
            raise InvalidValue(f"momentum must be in [0, 1), got {self.momentum}")


class FedAvgM(StreamingStrategy):
    name = "fedavgm"
    summary = "FedAvg with server momentum (Hsu et al. 2019)"
    Options = FedAvgMOptions
    options: FedAvgMOptions

    def __init__(self, options: FedAvgMOptions | None = None) -> None:
        super().__init__(options)
        self.velocity: dict[str, np.ndarray] | None = None

    def _begin(self, spec: dict[str, tuple[int, ...]]) -> None:
        if self.velocity is not None and {k: v.shape for k, v in self.velocity.items()} != spec:
            raise AggregationError("fedavgm: model shapes changed; momentum state does not fit")
        super()._begin(spec)

    def _server_step(
        self, weights: Mapping[str, np.ndarray], step: Mapping[str, np.ndarray]
    ) -> tuple[Mapping[str, np.ndarray], dict[str, Any]]:
        beta = np.float32(self.options.momentum)
        if self.velocity is None:
            velocity = {k: np.array(s, np.float32) for k, s in step.items()}
        else:
            velocity = {k: beta * v + step[k] for k, v in self.velocity.items()}
        lr = np.float32(self.server_lr)
        return {k: w + lr * velocity[k] for k, w in weights.items()}, {"velocity": velocity}

    def state_dict(self) -> StateDict:
        d = super().state_dict()
        for k, v in (self.velocity or {}).items():
            d[f"velocity/{k}"] = v.copy()
        return d

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        spec = state_spec(d, "velocity")
        velocity = check_state_arrays(self.name, d, "velocity", spec) if spec else None
        super().load_state_dict(d)
        self.velocity = velocity
