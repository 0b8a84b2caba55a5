"""Adaptive learning rates of the service, driven by the central validation accuracy.

Two independent reduce-on-plateau schedules (``aggregator.schedules``), each optional:

- ``adaptive_lr`` (devices): the round task's ``hyper.lr``;
- ``adaptive_server_lr`` (server): the strategy's ``server_lr``, the step size of FedAvg's
  ``w + server_lr * mean_delta`` and of the server optimizers (FedAvgM, FedAdam, ...).

Both are stepped once per published version with its central accuracy, their values are
written to the round's metrics (``client_lr``, ``server_lr``) and kept in the checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from aggregator.config import AggregatorConfig, PlateauSettings
from aggregator.schedules import PlateauConfig, ReduceOnPlateau
from aggregator.strategies.base import Strategy
from fedge.envelopes import TrainHyper
from fedge.errors import ConfigError

__all__ = ["AdaptiveLR"]

log = logging.getLogger(__name__)


def _schedule(initial: float, s: PlateauSettings, what: str) -> ReduceOnPlateau:
    try:
        return ReduceOnPlateau(
            initial, PlateauConfig("max", s.factor, s.patience, s.threshold, s.cooldown, s.min_lr)
        )
    except ValueError as e:
        raise ConfigError(f"{what}: {e}") from None


class AdaptiveLR:
    def __init__(self, config: AggregatorConfig, strategy: Strategy, *, has_eval: bool) -> None:
        self.strategy = strategy
        self.client: ReduceOnPlateau | None = None
        self.server: ReduceOnPlateau | None = None
        if config.adaptive_lr is not None:
            self.client = _schedule(config.hyper.lr, config.adaptive_lr, "adaptive_lr")
        if config.adaptive_server_lr is not None:
            self.server = _schedule(
                strategy.server_lr, config.adaptive_server_lr, "adaptive_server_lr"
            )
        if (self.client or self.server) and not has_eval:
            log.warning(
                "adaptive learning rates follow the central accuracy: without eval_data "
                "they never change"
            )

    def __bool__(self) -> bool:
        return self.client is not None or self.server is not None

    def hyper(self, hyper: TrainHyper) -> TrainHyper:
        """The round's hyper-parameters with the scheduled device learning rate."""
        return hyper if self.client is None else replace(hyper, lr=self.client.value)

    def step(self, metrics: dict[str, Any], client_lr: float) -> None:
        """Record the rates this version was made with, then step on its accuracy."""
        if self.client is not None:
            metrics["client_lr"] = client_lr
        if self.server is not None:
            metrics["server_lr"] = self.strategy.server_lr
        if "accuracy" not in metrics:
            return
        acc = float(metrics["accuracy"])
        if self.client is not None and self.client.step(acc):
            log.info("central accuracy plateaued: device lr -> %g", self.client.value)
        if self.server is not None and self.server.step(acc):
            self.strategy.set_server_lr(self.server.value)
            log.info("central accuracy plateaued: server lr -> %g", self.server.value)

    def state_dict(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {}
        for name, s in (("client_lr", self.client), ("server_lr", self.server)):
            if s is not None:
                out.update({f"{name}.{k}": v for k, v in s.state_dict().items()})
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from checkpoint keys ``client_lr.*`` / ``server_lr.*`` (others ignored)."""
        for name, s in (("client_lr", self.client), ("server_lr", self.server)):
            part = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(f"{name}.")}
            if s is not None and part:
                s.load_state_dict(part)
        if self.server is not None:
            self.strategy.set_server_lr(self.server.value)
