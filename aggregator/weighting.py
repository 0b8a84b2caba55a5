"""How much a reported sample count may weigh: relative to the fleet's previous round.

FedAvg weighs each update by the device's own ``num_samples``; signed or not, the number is
the device's word. One update claiming 2**62 samples carried 99 % of the average under the old
absolute clamp (100,000). Now each round's weights are capped at ``max_sample_ratio`` times
the lower median of the weights that went into the previous version:

- The cap is known before the round's first update arrives, so a streaming fold (one update
  at a time, nothing held back) applies it as it goes, and a journal replay after a restart
  folds with the same cap (the reference is in the checkpoint).
- The lower median of a round's weights moves only if more than half of its devices move it,
  and by at most ``max_sample_ratio`` per round (the weights it is taken from were capped).
- Until a version exists (a new fleet's first round) the reference is unknown: the round
  takes updates with only ``max_num_samples``, and at its close, if one weight is above the
  cap its own lower median gives, it is folded again from its journal with that cap
  (``RoundLifecycle._refold_first_round``; sync mode). An async fleet's first version and a
  shard worker's first round after it starts keep only ``max_num_samples``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from aggregator.strategies.base import Strategy
from fedge.codecs import parse_codec
from fedge.envelopes import ModelUpdate
from fedge.limits import Limits
from fedge.tensors import TensorSpec

__all__ = ["SampleCap", "lower_median", "refold_capped"]


def lower_median(values: Sequence[int]) -> int:
    """The lower of the two middle values (0 for none): one liar of two cannot raise it."""
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


@dataclass(frozen=True)
class SampleCap:
    """``max_num_samples``: absolute clamp; ``ratio``: relative cap (0 = none)."""

    max_num_samples: int
    ratio: float

    def cap(self, reference: int) -> int:
        """The largest weight an update may have in a round whose reference is ``reference``
        (the previous round's lower median; 0 = unknown)."""
        if self.ratio <= 0 or reference <= 0:
            return self.max_num_samples
        return max(1, min(self.max_num_samples, math.floor(self.ratio * reference)))


def refold_capped(
    strategy: Strategy,
    journaled: Iterable[tuple[str, bytes]],
    counted: Mapping[str, str],
    spec: TensorSpec,
    limits: Limits,
    limit: int,
) -> list[int]:
    """Fold a round again from its journal with every weight capped at ``limit``; the weights
    used. Only the updates ``counted`` (device -> update id) go in, one decoded at a time; they
    were validated when they came."""
    strategy.begin_round(spec)
    weights = []
    for device, payload in journaled:
        upd = ModelUpdate.from_bytes(payload, limits)
        if counted.get(device) != upd.update_id:
            continue  # journaled, then refused by the strategy
        w = min(upd.num_samples, limit)
        strategy.fold(parse_codec(upd.codec).decode(upd.delta, spec, limits), w)
        weights.append(w)
    return weights
