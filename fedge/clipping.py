"""Update norms and L2 clipping, for central DP, norm bounding and local DP alike.

Two norms, for two uses:

- ``squared_norm`` is the aggregator's hot path (norm bounding in every strategy's ``fold``,
  the accumulator's overflow check, the shard workers): one float32 BLAS dot per tensor, in
  which NaN and Inf propagate, so a finite result proves every value finite; a non-finite
  result from finite values (float32 squares overflow past ~1.8e19) is recomputed in float64.
  A NaN or Inf raises ``AggregationError``: the round refuses that update.
- ``l2_norm`` / ``clip_update`` (DP-FedAvg's sum, a device's local DP) work in float64
  throughout, and a non-finite norm raises ``ValueError`` instead of being scaled into NaN or
  zero, which is how a NaN slips past other clippers.

Both bound a norm the same way (``scale_to_norm``): an update within the bound is left
alone, a longer one is scaled down to it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedge.errors import AggregationError

__all__ = [
    "clip_scale",
    "clip_update",
    "l2_norm",
    "scale_to_norm",
    "squared_norm",
    "update_norm",
]


def squared_norm(delta: Mapping[str, np.ndarray]) -> float:
    """``sum(delta**2)`` over all tensors; ``AggregationError`` if any value is NaN or Inf.

    One float32 BLAS dot per tensor (NaN and Inf propagate through it); a non-finite result
    from finite values (the squares overflow float32) is recomputed in float64.
    """
    sq = 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for a in delta.values():
            flat = np.asarray(a).reshape(-1)
            sq += float(np.dot(flat, flat))
    if math.isfinite(sq):
        return sq
    for name, a in delta.items():
        if not np.isfinite(a).all():
            raise AggregationError(f"update tensor {name} contains NaN or Inf")
    return sum(
        float(np.dot(x, x)) for x in (np.asarray(a, np.float64).ravel() for a in delta.values())
    )


def update_norm(delta: Mapping[str, np.ndarray]) -> float:
    """L2 norm of a whole update (all tensors); ``AggregationError`` if any value is not finite.

    A huge but finite update (its squares overflow float32) gets a float64 norm, so it is
    clipped, never refused.
    """
    return math.sqrt(squared_norm(delta))


def scale_to_norm(norm: float, clip_norm: float) -> float:
    """The factor that brings an update of L2 norm ``norm`` within ``clip_norm`` (1.0 if it is)."""
    return 1.0 if norm <= clip_norm else clip_norm / norm


def clip_scale(delta: Mapping[str, np.ndarray], clip_norm: float) -> float:
    """The factor that bounds ``delta``'s L2 norm by ``clip_norm``; ``AggregationError`` if
    any value is NaN or Inf (``squared_norm``). A huge but finite update is scaled, never
    refused."""
    return scale_to_norm(update_norm(delta), clip_norm)


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
    scale = scale_to_norm(norm, clip_norm)
    return {k: np.asarray(v, dtype=np.float64) * scale for k, v in delta.items()}, norm
