"""Federated pruning on the aggregator: a schedule of sparsity over versions, the mask it gives,
and what the service does with it (mask the weights, drop the strategy's state of pruned
weights, carry the mask on every task, keep it in the checkpoint).

Gradual magnitude pruning (Zhu & Gupta, 2017): from version ``start`` to ``end`` the sparsity
follows ``s(v) = target * (1 - (1 - (v - start) / (end - start))^3)``, fast at first while the
network is redundant and slowly at the end; after ``end`` devices fine-tune under the final
mask. A mask only grows: a pruned weight never comes back (its value and the strategy's
state of it are zero).

The target is always a weight sparsity.

- ``unstructured``: weights (tensors of 2 or more dimensions) with the smallest magnitude
  among the live ones, ranked per tensor (``layer``) or over all of them (``global``). The
  target is the fraction of those weights pruned.
- ``structured``: whole hidden units / output channels (``models.units.unit_groups``), scored
  on the global model by the L2 norm of their incoming weights (and bias) times the L2 norm of
  the weights that read them (the incoming norm divided by the square root of the fan-in
  under ``global``, so that layers compare). The target is the fraction of the model's
  weights (biases included) that are zero, reached with the fewest whole units (for the
  digits MLP, 50 % of the weights is 26 of each layer's 64 units); every layer keeps at
  least one unit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from aggregator.evaluation import evaluate_onnx
from aggregator.prune_config import PruningConfig
from aggregator.strategies.base import Strategy
from fedge.masks import Keep, Mask, sparsity
from fedge.support.fsutil import atomic_write
from fedge.tensors import TensorSpec, spec_of
from models.units import UnitGroup, unit_groups

if TYPE_CHECKING:
    from aggregator.publisher import ModelPublisher

__all__ = ["Pruner", "schedule", "structured_units", "unstructured_keep"]

log = logging.getLogger(__name__)


def schedule(cfg: PruningConfig, version: int) -> float:
    """The target sparsity of ``version`` (cubic from ``start_round`` to ``end_round``)."""
    if version < cfg.start_round:
        return 0.0
    if version >= cfg.end_round:
        return cfg.target
    progress = (version - cfg.start_round) / (cfg.end_round - cfg.start_round)
    return cfg.target * (1.0 - (1.0 - progress) ** 3)


def unstructured_keep(
    weights: Mapping[str, np.ndarray], keep: Keep, level: float, scope: str
) -> Keep:
    """Keep flags pruning ``level`` of the weights of every 2+-D tensor, the already pruned
    ones (``keep``) first, then the smallest magnitudes."""
    names = [k for k, v in weights.items() if v.ndim >= 2]
    old = {k: keep.get(k, np.ones(weights[k].shape, dtype=bool)) for k in names}
    if scope == "global":
        scores = np.concatenate([_scores(weights[k], old[k]) for k in names])
        flat = _prune_lowest(scores, round(level * scores.size))
        out, at = {}, 0
        for k in names:
            n = weights[k].size
            out[k] = flat[at : at + n].reshape(weights[k].shape)
            at += n
        return out
    return {
        k: _prune_lowest(_scores(weights[k], old[k]), round(level * weights[k].size)).reshape(
            weights[k].shape
        )
        for k in names
    }


def _scores(w: np.ndarray, keep: np.ndarray) -> np.ndarray:
    # Pruned weights score -1: always the first to go, so a mask only grows.
    return np.where(keep, np.abs(w), -1.0).ravel()


def _prune_lowest(scores: np.ndarray, count: int) -> np.ndarray:
    """Keep flags removing the ``count`` lowest scores (ties broken by position), at least
    one weight kept."""
    count = min(max(count, int((scores < 0).sum())), scores.size - 1)
    keep = np.ones(scores.size, dtype=bool)
    keep[np.argsort(scores, kind="stable")[:count]] = False
    return keep


def structured_units(
    weights: Mapping[str, np.ndarray],
    groups: tuple[UnitGroup, ...],
    pruned: Mapping[str, tuple[int, ...]],
    level: float,
    scope: str,
) -> dict[str, tuple[int, ...]]:
    """Layer -> pruned unit indices (sorted) for ``level`` of the units of ``groups``."""
    scores: dict[str, np.ndarray] = {}
    for g in groups:
        w = weights[g.weight].reshape(weights[g.weight].shape[0], -1)
        s = np.sqrt((w**2).sum(axis=1) + (weights[g.bias] ** 2 if g.bias else 0.0))
        if scope == "global":
            s = s / math.sqrt(w.shape[1])
        # x the norm of what reads the unit: with ReLU a unit's incoming weights can shrink
        # while its outgoing ones grow, so the product is what the unit contributes.
        for tensor, axis in g.slices:
            if tensor not in (g.weight, g.bias):
                reads = np.moveaxis(weights[tensor], axis, 0).reshape(len(s), -1)
                s = s * np.sqrt((reads**2).sum(axis=1))
        s[list(pruned.get(g.layer, ()))] = -1.0
        scores[g.layer] = s
    if scope == "global":
        layers = [g.layer for g in groups]
        allv = np.concatenate([scores[k] for k in layers])
        owner = np.concatenate([np.full(scores[k].size, i) for i, k in enumerate(layers)])
        count = round(level * allv.size)
        left = {k: scores[k].size for k in layers}
        cut: dict[str, list[int]] = {k: [] for k in layers}
        offsets = np.cumsum([0] + [scores[k].size for k in layers])
        for j in np.argsort(allv, kind="stable"):
            if sum(len(v) for v in cut.values()) >= count:
                break
            k = layers[int(owner[j])]
            if left[k] > 1:
                cut[k].append(int(j - offsets[int(owner[j])]))
                left[k] -= 1
        return {k: tuple(sorted(v)) for k, v in cut.items() if v}
    out = {}
    for k, s in scores.items():
        n = min(max(round(level * s.size), int((s < 0).sum())), s.size - 1)
        if n:
            out[k] = tuple(sorted(int(i) for i in np.argsort(s, kind="stable")[:n]))
    return out


class Pruner:
    """The service's pruning: the current mask, stepped once per version."""

    def __init__(self, cfg: PruningConfig, model_name: str, strategy: Strategy) -> None:
        self.cfg = cfg
        self.strategy = strategy
        self.groups = unit_groups(model_name)
        if cfg.kind == "structured" and not self.groups:
            raise ValueError(f"model {model_name!r} has no hidden units to prune structurally")
        self.keep: Keep = {}
        self.units: dict[str, tuple[int, ...]] = {}  # structured: layer -> pruned units
        self.mask: Mask | None = None
        self.level = 0.0
        self._loaded: dict[str, Any] = {}
        self._spec: dict[str, tuple[int, ...]] = {}

    def step(self, version: int, weights: dict[str, np.ndarray]) -> None:
        """Advance the mask to ``version``'s sparsity; mask ``weights`` in place and drop
        the strategy's state of pruned weights."""
        level = schedule(self.cfg, version)
        if level > self.level:
            if self.cfg.kind == "structured":
                self.units = self._units_for(weights, level)
            else:
                self.keep = unstructured_keep(weights, self.keep, level, self.cfg.scope)
            self.level = level
            self._build(spec_of(weights))
            log.info("version %d: pruned to %.1f %% (%s)", version, 100 * level, self.cfg.kind)
        self._spec = spec_of(weights)
        self.apply(weights)
        if self.keep:
            self.strategy.drop_state(self.keep)

    def apply(self, weights: dict[str, np.ndarray]) -> None:
        for k, flags in self.keep.items():
            weights[k] = np.where(flags, weights[k], np.float32(0)).astype(np.float32)

    def _units_for(
        self, weights: Mapping[str, np.ndarray], level: float
    ) -> dict[str, tuple[int, ...]]:
        """The fewest units (the same fraction of every layer under ``layer``, by rank under
        ``global``) whose removal makes ``level`` of the model's weights zero: bisection on
        the fraction of units, as sparsity only grows with it."""
        spec = spec_of(weights)

        def units_at(fraction: float) -> dict[str, tuple[int, ...]]:
            return structured_units(weights, self.groups, self.units, fraction, self.cfg.scope)

        def reached(units: dict[str, tuple[int, ...]]) -> bool:
            mask = Mask(cuts=self.cuts(units))
            return bool(mask) and sparsity(mask.keep(spec), spec) >= level

        lo, hi = 0.0, 1.0
        best = units_at(hi)  # as far as it goes (one unit left per layer)
        for _ in range(24):
            mid = (lo + hi) / 2
            units = units_at(mid)
            if reached(units):
                hi, best = mid, units
            else:
                lo = mid
        return best

    def cuts(
        self, units: Mapping[str, tuple[int, ...]] | None = None
    ) -> dict[str, tuple[tuple[int, tuple[int, ...]], ...]]:
        """Structured: tensor -> ((axis, removed indices), ...), what the mask and the
        serving model remove (of ``units``, default the current ones)."""
        units = self.units if units is None else units
        out: dict[str, list[tuple[int, tuple[int, ...]]]] = {}
        for g in self.groups:
            idx = units.get(g.layer)
            if idx:
                for tensor, axis in g.slices:
                    out.setdefault(tensor, []).append((axis, idx))
        return {k: tuple(sorted(v)) for k, v in out.items()}

    def _build(self, spec: TensorSpec) -> None:
        self._spec = dict(spec)
        if self.cfg.kind == "structured":
            mask = Mask(cuts=self.cuts())
        else:
            mask = Mask.from_keep(self.keep)
        self.mask = mask or None
        self.keep = mask.keep(spec) if mask else {}

    def serve(
        self,
        pub: ModelPublisher,
        version: int,
        ranges: Mapping[str, tuple[float, float]] | None,
    ) -> dict[str, float]:
        """The serving model of the rendered version: structured cuts removed
        (``models.shrink``), in the registry as ``vNNNNNN.serving.onnx`` (and its int8 twin
        ``.serving.int8.onnx`` when the twin is built); its size, accuracy and sparsity."""
        from models.shrink import shrink_onnx

        out = {"sparsity": sparsity(self.keep, self._spec), "prune_level": self.level}
        onnx = shrink_onnx(pub.onnx, self.cuts()) if self.units else pub.onnx
        out["serving_bytes"] = float(len(onnx))
        path = pub.registry.save_serving(version, onnx)
        if pub.eval_set is not None:
            out["serving_accuracy"] = evaluate_onnx(onnx, pub.eval_set)["accuracy"]
        if self.cfg.kind == "structured" and self.units and ranges:
            from aggregator.calibration import build_int8

            twin = build_int8(onnx, ranges)
            if twin.onnx is not None:
                out["serving_int8_bytes"] = float(len(twin.onnx))
                atomic_write(path.with_suffix(".int8.onnx"), twin.onnx)
        return out

    # -- checkpoint (aggregator.checkpoint.StateFile) ------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"pruning.level": self.level}
        if self.cfg.kind == "structured":
            for layer, units in self.units.items():
                d[f"pruning.units/{layer}"] = np.asarray(units, dtype=np.float32)
        else:
            for name, flags in self.keep.items():
                d[f"pruning.keep/{name}"] = flags.astype(np.float32)
        return d

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        """Take the checkpoint's pruning state; ``restore`` rebuilds the mask from it."""
        self._loaded = dict(d)

    def restore(self, spec: TensorSpec) -> None:
        """The mask of the loaded checkpoint (none: a new model, or a checkpoint from before
        pruning was configured, which starts dense)."""
        d, self._loaded = self._loaded, {}
        level = d.get("pruning.level")
        if level is None:
            return
        self.level = float(level)
        if self.cfg.kind == "structured":
            self.units = {
                k.removeprefix("pruning.units/"): tuple(int(i) for i in np.asarray(v))
                for k, v in d.items()
                if k.startswith("pruning.units/")
            }
        else:
            self.keep = {
                k.removeprefix("pruning.keep/"): np.asarray(v) > 0.5
                for k, v in d.items()
                if k.startswith("pruning.keep/")
            }
        self._build(spec)
