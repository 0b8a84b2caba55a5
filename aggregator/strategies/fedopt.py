"""Adaptive server optimizers (Reddi et al., "Adaptive Federated Optimization", ICLR 2021).

The round's weighted-mean delta ``d`` is the pseudo-gradient (it points downhill: ``d`` is
``local - global``). Algorithm 2 of the paper, without bias correction::

    m <- beta1 * m + (1 - beta1) * d                 m starts at 0
    v <- second_moment(v, d * d)                     v starts at tau^2 (paper: v_-1 >= tau^2)
    w <- w + server_lr * m / (sqrt(v) + tau)

FedAdam, FedYogi and FedAdagrad differ only in ``second_moment``. State (m, v, t) is float32,
as stored in the checkpoint, so a restored optimizer takes bit-identical next steps.
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from collections.abc import Mapping
from typing import Any

import numpy as np

from aggregator.strategies.base import StateDict, check_state_arrays, state_spec
from aggregator.strategies.options import opt
from aggregator.strategies.streaming import StreamingOptions, StreamingStrategy
from fedge.errors import AggregationError, InvalidValue

__all__ = ["FedOpt", "FedOptOptions"]


@dataclasses.dataclass(frozen=True)
class FedOptOptions(StreamingOptions):
    server_lr: float = opt(1e-2, "server learning rate eta")
    tau: float = opt(1e-3, "adaptivity tau: larger is closer to momentum SGD")
    beta1: float = opt(0.9, "first-moment decay in [0, 1)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.tau > 0:
            raise InvalidValue(f"tau must be > 0, got {self.tau}")
        if not 0 <= self.beta1 < 1:
            raise InvalidValue(f"beta1 must be in [0, 1), got {self.beta1}")


class FedOpt(StreamingStrategy):
    Options = FedOptOptions
    options: FedOptOptions

    def __init__(self, options: FedOptOptions | None = None) -> None:
        super().__init__(options)
        self.m: dict[str, np.ndarray] | None = None
        self.v: dict[str, np.ndarray] | None = None
        self.t = 0

    @abstractmethod
    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray: ...

    def _begin(self, spec: dict[str, tuple[int, ...]]) -> None:
        if self.m is not None and {k: a.shape for k, a in self.m.items()} != spec:
            raise AggregationError(
                f"{self.name}: model shapes changed; optimizer state does not fit"
            )
        super()._begin(spec)

    def _server_step(
        self, weights: Mapping[str, np.ndarray], step: Mapping[str, np.ndarray]
    ) -> tuple[Mapping[str, np.ndarray], dict[str, Any]]:
        o = self.options
        b1, tau = np.float32(o.beta1), np.float32(o.tau)
        lr = np.float32(self.server_lr)
        m0 = self.m or {k: np.zeros_like(d, np.float32) for k, d in step.items()}
        v0 = self.v or {k: np.full_like(d, tau * tau, np.float32) for k, d in step.items()}
        m, v, new = {}, {}, {}
        for k, w in weights.items():
            d = np.asarray(step[k], np.float32)
            m[k] = b1 * m0[k] + (np.float32(1) - b1) * d
            v[k] = self._second_moment(v0[k], d * d).astype(np.float32)
            new[k] = w + lr * m[k] / (np.sqrt(v[k]) + tau)
        return new, {"m": m, "v": v, "t": self.t + 1}

    def state_dict(self) -> StateDict:
        d = super().state_dict()
        d["t"] = self.t
        for name, arrays in (("m", self.m), ("v", self.v)):
            for k, a in (arrays or {}).items():
                d[f"{name}/{k}"] = a.copy()
        return d

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        t = d.get("t")
        if isinstance(t, bool) or not isinstance(t, int | np.integer) or t < 0:
            raise ValueError(f"{self.name} state: t must be an integer >= 0, got {t!r}")
        spec = state_spec(d, "m")
        if spec != state_spec(d, "v") or bool(spec) != (t > 0):
            raise ValueError(f"{self.name} state: m and v must cover the same tensors once t > 0")
        m = check_state_arrays(self.name, d, "m", spec) if spec else None
        v = check_state_arrays(self.name, d, "v", spec) if spec else None
        if v is not None and any((a < 0).any() for a in v.values()):
            raise ValueError(f"{self.name} state: v must be >= 0")
        super().load_state_dict(d)
        self.m, self.v, self.t = m, v, int(t)
