"""Linear strategies: updates go into a streaming weighted sum, memory O(model) per round.

The aggregated step is the sample-weighted mean ``sum_i n_i s_i delta_i / sum_i n_i`` where
``s_i`` folds the staleness weight and norm bounding of update i (1 when neither applies).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from aggregator.strategies.accumulator import WeightedSum
from aggregator.strategies.base import Strategy
from aggregator.strategies.options import StrategyOptions, opt
from fedge.errors import InvalidValue

__all__ = ["StreamingOptions", "StreamingStrategy"]

_ACCUMULATE: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
}


@dataclasses.dataclass(frozen=True)
class StreamingOptions(StrategyOptions):
    accumulate: str = opt(
        "float32", "running-sum precision: float32 (memory-speed) or float64 (exact, ~3x slower)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.accumulate not in _ACCUMULATE:
            raise InvalidValue(
                f"accumulate must be one of {', '.join(_ACCUMULATE)}, got {self.accumulate!r}"
            )


class StreamingStrategy(Strategy):
    Options = StreamingOptions
    sums_linearly = True
    options: StreamingOptions

    def __init__(self, options: StreamingOptions | None = None) -> None:
        super().__init__(options)
        self._acc: WeightedSum | None = None

    def _begin(self, spec: dict[str, tuple[int, ...]]) -> None:
        acc = self._acc
        if acc is not None and acc.spec == spec:
            # Reuse the buffers of the last round: no allocation (and no page faults) per round.
            for a in acc.sums.values():
                a.fill(0.0)
            acc.total_weight, acc.count = 0.0, 0
        else:
            self._acc = WeightedSum(spec, _ACCUMULATE[self.options.accumulate])

    def _fold(self, delta: Mapping[str, np.ndarray], weight: float, scale: float) -> None:
        assert self._acc is not None
        self._acc.add(delta, weight, scale=scale, sq_norm=self.fold_sq_norm)

    def fold_sum(self, sums: Mapping[str, np.ndarray], total_weight: float, count: int) -> None:
        """Take a share of the round summed elsewhere (sharded aggregation: the merge of the
        shard workers' partial sums, norm bounding already applied by the workers)."""
        self._require_round("fold_sum")
        assert self._acc is not None
        self._acc.add_sum(sums, total_weight, count)

    @property
    def count(self) -> int:
        return 0 if self._acc is None else self._acc.count

    def _aggregate(self) -> Mapping[str, np.ndarray]:
        assert self._acc is not None
        return self._acc.mean()
