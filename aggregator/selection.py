"""Which devices a round asks: seeded, online only, over-selected against dropouts.

Semantics of :func:`select_clients`:

- *Eligible* devices are the candidates that are online (``online`` holds the ids whose
  latest status is not ``offline``). Offline devices are never selected.
- The *target* is how many updates the round wants: ``count`` if given, else
  ``ceil(fraction * len(candidates))`` (a fraction of the whole fleet, so the target does not
  shrink when devices go offline), else every eligible device. At least 1.
- Over-selection asks ``ceil(target * (1 + over_select))`` devices, so the round still meets
  its target when that fraction of the asked devices drops out; never more than are eligible.
  The service closes the round at the target (:func:`round_target`), not at the number asked.
- The draw is uniform without replacement from the eligible ids in sorted order, with the
  caller's ``numpy.random.Generator``: the same seed, candidates and online set give the same
  selection, whatever the iteration order of the inputs. The result is sorted.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable

import numpy as np

__all__ = ["round_target", "select_clients"]


def round_target(
    num_candidates: int, *, fraction: float | None = None, count: int | None = None
) -> int:
    """How many updates a round wants (see the module docstring); validates its arguments."""
    if fraction is not None and count is not None:
        raise ValueError("give either fraction or count, not both")
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be an integer >= 1, got {count!r}")
        return count
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        return max(1, math.ceil(fraction * num_candidates))
    return max(1, num_candidates)


def select_clients(
    candidates: Iterable[str],
    online: Collection[str],
    *,
    fraction: float | None = None,
    count: int | None = None,
    over_select: float = 0.0,
    rng: np.random.Generator,
) -> tuple[str, ...]:
    """The sorted device ids asked this round; may be fewer than the target if few are online."""
    if not (over_select >= 0 and math.isfinite(over_select)):
        raise ValueError(f"over_select must be a finite number >= 0, got {over_select!r}")
    pool = sorted(set(candidates))
    eligible = [d for d in pool if d in online]
    if fraction is None and count is None:
        return tuple(eligible)
    target = round_target(len(pool), fraction=fraction, count=count)
    # round() first: 10 * (1 + 0.1) is 11.000000000000002 in binary floating point.
    asked = min(len(eligible), math.ceil(round(target * (1.0 + over_select), 9)))
    if asked == 0:
        return ()
    picked = rng.choice(len(eligible), size=asked, replace=False)
    return tuple(sorted(eligible[i] for i in picked))
