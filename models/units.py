"""Which weights make up one hidden unit of each zoo model, for structured pruning.

Plain data, no torch: the aggregator ranks and cuts units with numpy alone
(``aggregator.pruning``), and ``models.shrink`` removes the same slices from an ONNX file.
Keep it in step with ``models.zoo``: ``tests/unit/test_pruning.py`` checks every entry against
the built module.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

__all__ = ["UnitGroup", "unit_groups"]


@dataclass(frozen=True)
class UnitGroup:
    """The hidden units (output channels) of one layer, for structured pruning: removing unit
    ``i`` removes index ``i`` along each ``(tensor, axis)`` of ``slices`` (the layer's weight
    rows, its bias, the next layer's input columns); ``weight`` and ``bias`` score it."""

    layer: str
    weight: str
    bias: str | None
    slices: tuple[tuple[str, int], ...]


def _chain(*layers: str) -> tuple[UnitGroup, ...]:
    """Units of every layer but the last of a feed-forward chain (the last emits logits)."""
    return tuple(
        UnitGroup(
            a,
            f"{a}.weight",
            f"{a}.bias",
            ((f"{a}.weight", 0), (f"{a}.bias", 0), (f"{b}.weight", 1)),
        )
        for a, b in itertools.pairwise(layers)
    )


_UNITS: dict[str, tuple[UnitGroup, ...]] = {
    "cnn1d": _chain("conv1", "conv2", "fc"),
    "logreg": (),
    "mlp": _chain("fc1", "fc2", "fc3"),
}


def unit_groups(name: str) -> tuple[UnitGroup, ...]:
    """The prunable unit groups of a registered model (empty: none)."""
    return _UNITS.get(name, ())
