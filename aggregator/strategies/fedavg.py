"""FedAvg (McMahan et al. 2017): the sample-weighted mean of deltas, n_i / n, applied with a
server learning rate (1.0 is plain FedAvg)."""

from __future__ import annotations

from aggregator.strategies.streaming import StreamingStrategy

__all__ = ["FedAvg"]


class FedAvg(StreamingStrategy):
    name = "fedavg"
    summary = "sample-weighted mean of the deltas (McMahan et al. 2017)"
