"""What a device checks of a task against the model it holds before it trains: the pruning
mask's keep flags and the fine-tuned tensors (protocol §5.2 "mask", "trainable").

A task naming a tensor the model lacks cannot be honoured: the device skips the round with
the reason (``ValueError``), rather than train something the aggregator would refuse.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedge.envelopes import RoundTask
from fedge.masks import Keep
from fedge.tensors import spec_of
from fedge.trainable import check_trainable

__all__ = ["RoundPlan", "plan_round"]


@dataclass(frozen=True)
class RoundPlan:
    keep: Keep | None  # pruned rounds: the live flags of the masked tensors
    trainable: tuple[str, ...] | None  # fine-tuning rounds: the only tensors trained and sent

    def train_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the train function, only those used (a train function need
        not know them)."""
        kw: dict[str, Any] = {}
        if self.keep is not None:
            kw["mask"] = self.keep  # pruned weights stay exactly zero
        if self.trainable is not None:
            kw["trainable"] = self.trainable  # the other tensors stay exactly as they are
        return kw


def plan_round(t: RoundTask, weights: Mapping[str, np.ndarray]) -> RoundPlan:
    """``ValueError`` saying why ``t`` cannot be honoured with ``weights``' model."""
    spec = spec_of(weights)
    try:
        keep = t.mask.keep(spec) if t.mask else None
    except ValueError as e:
        raise ValueError(f"cannot honour mask: {e}") from None
    if t.trainable is not None:
        try:
            check_trainable(t.trainable, spec)
        except ValueError as e:
            raise ValueError(f"cannot honour trainable: {e}") from None
    return RoundPlan(keep, t.trainable)
