"""L2 clipping of a whole update, shared by central DP (aggregator) and local DP (device).

One rule on both sides: the norm is taken over all tensors in float64 (float32 squares
overflow past ~1.8e19), and a non-finite norm raises ``ValueError`` instead of being scaled
into NaN or zero, which is how a NaN slips past other clippers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

__all__ = ["clip_update", "l2_norm"]


def l2_norm(delta: Mapping[str, np.ndarray]) -> float:
    """L2 norm over all tensors, in float64."""
    total = 0.0
    for v in delta.values():
        a = np.asarray(v, dtype=np.float64).ravel()
        total += float(np.dot(a, a))
    return math.sqrt(total)


def clip_update(
    delta: Mapping[str, np.ndarray], clip_norm: float
) -> tuple[dict[str, np.ndarray], float]:
    """``delta`` scaled to L2 norm at most ``clip_norm`` (float64), and its norm before."""
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    norm = l2_norm(delta)
    if not math.isfinite(norm):
        raise ValueError("update has a non-finite L2 norm (NaN or Inf in it)")
    scale = 1.0 if norm <= clip_norm else clip_norm / norm
    return {k: np.asarray(v, dtype=np.float64) * scale for k, v in delta.items()}, norm
