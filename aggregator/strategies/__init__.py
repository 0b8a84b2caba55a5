"""Aggregation strategies, one per module, looked up by name."""

from __future__ import annotations

from aggregator.strategies.base import Strategy
from aggregator.strategies.fedavg import FedAvg

__all__ = ["STRATEGIES", "Strategy", "make_strategy"]

STRATEGIES: dict[str, type[Strategy]] = {"fedavg": FedAvg}


def make_strategy(name: str, server_lr: float = 1.0) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}")
    return FedAvg(server_lr=server_lr)
