"""Staleness weights of asynchronous aggregation, FedBuff (Nguyen et al., AISTATS 2022).

No round barrier: a device trains whenever it holds a model version and sends its delta with
the version it started from. The service (``aggregator.modes.AsyncRounds``) computes the
update's staleness ``s = current_version - base_version``, refuses it past ``max_staleness``
(``too_stale``), and the strategy folds it with weight ``num_samples`` and its delta scaled by
``staleness_weight(s)`` (default ``1/sqrt(1+s)``), so the step is
``sum_i n_i w(s_i) delta_i / sum_i n_i``: stale updates move the model less. Every
``async_buffer`` (K) folded updates the strategy finishes a version; any strategy does the
math, server optimizers included.
"""

from __future__ import annotations

import dataclasses
import math

from fedge.errors import InvalidValue

__all__ = ["StalenessWeight"]

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
