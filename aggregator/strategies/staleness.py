"""Asynchronous aggregation, FedBuff (Nguyen et al., AISTATS 2022).

No round barrier: a device trains whenever it holds a model version and sends its delta with
the version it started from. The service computes the update's staleness
``s = current_version - base_version`` and calls ``buffer.offer(delta, num_samples, s)``:

- ``s > max_staleness``: dropped (``offer`` returns False, counted in ``dropped_stale``);
- otherwise folded into the strategy with weight ``num_samples`` and its delta scaled by
  ``staleness_weight(s)`` (default ``1/sqrt(1+s)``), so the step is
  ``sum_i n_i w(s_i) delta_i / sum_i n_i``: stale updates move the model less.

When ``buffer.ready`` (K updates held) the service calls ``buffer.flush(weights)`` for the
next version and publishes it. Any strategy does the math, server optimizers included; a
robust one holds K updates (memory O(K x model)). The buffer's contents are not checkpointed:
after a restart devices simply train on the current version again.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from aggregator.strategies.base import Strategy
from fedge.errors import AggregationError, InvalidValue
from fedge.tensors import TensorSpec

__all__ = ["AsyncBuffer", "StalenessWeight"]

_KINDS = ("poly", "const", "hinge")


@dataclasses.dataclass(frozen=True)
class StalenessWeight:
    """``poly:A`` -> ``(1+s)^-A`` (default A=0.5); ``const`` -> 1;
    ``hinge:A,B`` -> 1 for ``s <= B``, else ``1/(A(s-B)+1)`` (FedAsync's hinge)."""

    kind: str = "poly"
    a: float = 0.5
    b: int = 0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise InvalidValue(
                f"staleness weight must be one of {', '.join(_KINDS)}, got {self.kind!r}"
            )
        if not 0 <= self.a < math.inf or self.b < 0:
            raise InvalidValue(
                f"staleness weight parameters must be >= 0, got a={self.a}, b={self.b}"
            )

    @classmethod
    def parse(cls, spec: str) -> StalenessWeight:
        """``"poly:0.5"``, ``"const"``, ``"hinge:10,4"``; ``InvalidValue`` shows the forms."""
        kind, _, args = spec.strip().lower().partition(":")
        try:
            vals = [float(x) for x in args.split(",")] if args else []
            if kind == "const" and not vals:
                return cls("const", 0.0, 0)
            if kind == "poly" and len(vals) <= 1:
                return cls("poly", vals[0] if vals else 0.5, 0)
            if kind == "hinge" and len(vals) == 2 and vals[1].is_integer():
                return cls("hinge", vals[0], int(vals[1]))
        except ValueError:
            pass
        raise InvalidValue(
            f"bad staleness weight {spec!r}: write poly:A (e.g. poly:0.5), const or hinge:A,B"
        )

    def __call__(self, staleness: int) -> float:
        s = max(int(staleness), 0)
        if self.kind == "poly":
            return float((1.0 + s) ** -self.a)
        if self.kind == "hinge":
            return 1.0 if s <= self.b else 1.0 / (self.a * (s - self.b) + 1.0)
        return 1.0


class AsyncBuffer:
    def __init__(
        self,
        strategy: Strategy,
        spec: TensorSpec,
        *,
        buffer_size: int = 10,
        max_staleness: int = 32,
        weight: StalenessWeight | None = None,
    ) -> None:
        if buffer_size < 1:
            raise ValueError(f"buffer_size (K) must be >= 1, got {buffer_size}")
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.strategy = strategy
        self.spec = {k: tuple(s) for k, s in spec.items()}
        self.buffer_size = buffer_size
        self.max_staleness = max_staleness
        self.weight = weight or StalenessWeight()
        strategy.set_staleness_weight(self.weight)
        strategy.begin_round(self.spec)
        self.dropped_stale = 0
        self.flushes = 0
        self._staleness: list[int] = []

    def offer(self, delta: Mapping[str, np.ndarray], num_samples: int, staleness: int) -> bool:
        """Fold one update unless it is too stale; ``AggregationError`` if it is unusable."""
        if staleness < 0:
            raise AggregationError(f"staleness must be >= 0, got {staleness}")
        if staleness > self.max_staleness:
            self.dropped_stale += 1
            return False
        self.strategy.fold(delta, num_samples, staleness=staleness)
        self._staleness.append(int(staleness))
        return True

    @property
    def pending(self) -> int:
        return self.strategy.count

    @property
    def ready(self) -> bool:
        return self.strategy.count >= self.buffer_size

    def flush(self, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The next version's weights from the buffered updates; the buffer starts empty again.

        As with ``Strategy.finish`` the caller checks finiteness before publishing.
        """
        try:
            return self.strategy.finish(weights)
        finally:
            self.last_flush = self.stats()
            self.flushes += 1
            self._staleness = []
            self.strategy.begin_round(self.spec)

    def stats(self) -> dict[str, Any]:
        """For the metrics line: updates held, their staleness, drops so far."""
        s = self._staleness
        return {
            "buffered": len(s),
            "staleness_mean": (sum(s) / len(s)) if s else 0.0,
            "staleness_max": max(s, default=0),
            "dropped_stale": self.dropped_stale,
        }
