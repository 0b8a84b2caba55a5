"""Krum and Multi-Krum (Blanchard et al., NeurIPS 2017).

With n updates of which at most f are Byzantine, the score of update i is the sum of squared
distances to its ``n - f - 2`` nearest other updates; Krum takes the update with the lowest
score, Multi-Krum the mean of the ``m`` lowest (``m = 0`` means ``n - f``). Needs
``n >= 2f + 3``. Distances come from one float64 Gram matrix built slab by slab, so the extra
memory is O(n^2) beside the O(updates x model) buffer.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from aggregator.strategies.buffered import BufferedStrategy
from aggregator.strategies.options import StrategyOptions, opt
from fedge.errors import InvalidValue

__all__ = ["Krum", "KrumOptions", "MultiKrum", "MultiKrumOptions", "krum_scores"]


@dataclasses.dataclass(frozen=True)
class KrumOptions(StrategyOptions):
    f: int = opt(1, "number of Byzantine devices tolerated (needs n >= 2f + 3 updates)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.f < 0:
            raise InvalidValue(f"f must be >= 0, got {self.f}")


@dataclasses.dataclass(frozen=True)
class MultiKrumOptions(KrumOptions):
    m: int = opt(0, "updates averaged (0 = n - f)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.m < 0:
            raise InvalidValue(f"m must be >= 0 (0 = n - f), got {self.m}")


def krum_scores(sq_dist: np.ndarray, f: int) -> np.ndarray:
    """Krum scores from an ``n x n`` matrix of squared distances."""
    n = sq_dist.shape[0]
    closest = n - f - 2
    others = np.sort(sq_dist + np.diag(np.full(n, np.inf)), axis=1)[:, :closest]
    return others.sum(axis=1)


class Krum(BufferedStrategy):
    name = "krum"
    summary = "Krum: the update closest to its n-f-2 neighbours (Blanchard et al. 2017)"
    Options: ClassVar[type[StrategyOptions]] = KrumOptions
    options: KrumOptions

    def __init__(self, options: KrumOptions | None = None) -> None:
        super().__init__(options)
        self.last_selected: tuple[int, ...] = ()
        """Fold-order indices of the updates the last ``finish`` used."""

    @property
    def min_updates(self) -> int:
        return 2 * self.options.f + 3

    def _selected(self) -> int:
        return 1

    def _combine(self, rows: list[np.ndarray]) -> np.ndarray:
        n, f = len(rows), self.options.f
        gram = np.zeros((n, n))
        for _, slab in self._slabs(rows):
            s = slab.astype(np.float64)
            gram += s @ s.T
        sq = np.diag(gram)
        dist = np.maximum(sq[:, None] + sq[None, :] - 2 * gram, 0.0)
        m = min(self._selected() or n - f, n)
        chosen = np.argsort(krum_scores(dist, f), kind="stable")[:m]
        self.last_selected = tuple(int(i) for i in chosen)
        if m == 1:
            return rows[int(chosen[0])].copy()
        acc = np.zeros(self._size, np.float64)
        for i in chosen:
            acc += rows[int(i)]
        return (acc / m).astype(np.float32)


class MultiKrum(Krum):
    name = "multikrum"
    summary = "Multi-Krum: mean of the m best Krum scores (Blanchard et al. 2017)"
    Options = MultiKrumOptions
    options: MultiKrumOptions

    def _selected(self) -> int:
        return self.options.m
