"""The sparse neighbour graph of a round, derived from the roster and a public seed.

A Harary graph on a random cycle (Bell et al., CCS'20): order the roster by
``SHA-256(seed || UTF-8 device id)`` (bytes, ascending), then connect each device to the
``k/2`` devices before and after it on that cycle. ``k`` is even and below ``n - 1``;
``k >= n - 1`` is the complete graph. ``auto_degree`` is O(log n): ``2 * ceil(1.5 * log2 n)``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

__all__ = ["auto_degree", "neighbours", "threshold_for"]


def auto_degree(n: int) -> int:
    return 2 * math.ceil(1.5 * math.log2(max(n, 2)))


def effective_degree(n: int, degree: int) -> int:
    """The degree the graph of ``n`` devices really has for a requested ``degree``."""
    k = degree + (degree % 2)
    return n - 1 if k >= n - 1 else k


def threshold_for(degree: int, fraction: float) -> int:
    """Shares needed to recover a device's secret: ``floor(fraction * degree) + 1``, at most
    ``degree``. Its ``degree + 1`` holders are its neighbours and itself; with ``fraction >=
    0.5`` the threshold is a strict majority of its neighbours."""
    return max(1, min(degree, math.floor(fraction * degree) + 1))


def neighbours(roster: Sequence[str], seed: bytes, degree: int) -> dict[str, tuple[str, ...]]:
    """Each device's neighbours (sorted), a symmetric relation."""
    n = len(roster)
    k = effective_degree(n, degree)
    if k >= n - 1:
        return {d: tuple(sorted(e for e in roster if e != d)) for d in roster}
    order = sorted(roster, key=lambda d: hashlib.sha256(seed + d.encode()).digest())
    out: dict[str, tuple[str, ...]] = {}
    for i, d in enumerate(order):
        near = {order[(i + j) % n] for j in range(1, k // 2 + 1)}
        near |= {order[(i - j) % n] for j in range(1, k // 2 + 1)}
        out[d] = tuple(sorted(near))
    return out
