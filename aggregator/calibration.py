"""Federated calibration: merge the activation ranges devices report, build the int8 model.

Each device reports {activation name: (min, max)} measured on its own samples through the
round's global model (`edge_agent.calibration.compute_ranges`), inside its signed update
(`fedge.identity.update_digest` covers ``calib``). The ranges set the int8 grid of every
activation for the whole fleet, so one device must not be able to set them: a range of
[-1e30, 1e30] turns every activation into one grid step (the int8 twin fell from 0.644 to 0.100
accuracy, issue 17). The merge is therefore robust, per activation:

1. **Trimmed across devices.** Of n reports, the ``t = min(ceil(TRIM * n), (n - 1) // 2)``
   lowest minima and ``t`` highest maxima are dropped; the range is the lowest remaining min
   and the highest remaining max. With 3 to 10 devices one outlier on each side goes; with
   1 or 2 nothing can be trimmed (and it is min of mins, max of maxes, which is what
   onnxruntime's MinMax calibrator finds on the union of the devices' samples).
2. **Bounded by the previous version.** With the ranges the previous version was built from,
   each bound may move outward at most ``GROWTH`` times that range's width (or magnitude,
   whichever is larger) per version (with ``GROWTH = 1`` a range at most triples in width
   per version), so devices that outnumber the trim can only widen it step by step. The
   previous ranges live in the aggregator's memory: the first version after a restart is
   trimmed but not bounded.

Reports come from the network, so each is validated whole before it counts (`ProtocolError`
with reason ``bad_calibration`` otherwise, and the merged state is left untouched): a map of
at most `max_tensors` names, each an activation the model calibrates, each a pair of finite
float32 numbers with min <= max. The intake folds one report per counted update (duplicates
are refused before), and memory is O(reports x activations).

`build_int8` is what the service calls once per version; it returns no model, and says why,
when no device reported ranges (version 0, or a round of devices that skipped calibration):
that version is then published in fp32 only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from fedge.errors import ProtocolError
from models.int8 import MissingRanges, quantize_int8

__all__ = [
    "GROWTH",
    "MAX_CALIB_TENSORS",
    "TRIM",
    "Int8Build",
    "RangeMerger",
    "build_int8",
    "merge_ranges",
    "validate_ranges",
]

log = logging.getLogger(__name__)

# A report names each activation once; zoo models have a handful. The cap bounds the work
# and memory one message can cause (the envelope also caps its size).
MAX_CALIB_TENSORS = 1024
_MAX_NAME = 256
_REASON = "bad_calibration"
TRIM = 0.1  # share of devices trimmed at each end of every range (at least one from n = 3)
GROWTH = 1.0  # a bound moves at most this many previous widths outward per version

Ranges = dict[str, tuple[float, float]]


def validate_ranges(
    report: object, allowed: Collection[str], *, max_tensors: int = MAX_CALIB_TENSORS
) -> Ranges:
    """Check one device's report against the model's activations; return it as floats.

    Raises `ProtocolError(reason="bad_calibration")` on anything but a map of known names to
    finite float32 (min, max) pairs with min <= max, at most `max_tensors` of them.
    """
    if not isinstance(report, Mapping):
        raise ProtocolError(_REASON, f"calibration must be a map, got {type(report).__name__}")
    if not report:
        raise ProtocolError(_REASON, "calibration map is empty")
    if len(report) > max_tensors:
        raise ProtocolError(_REASON, f"{len(report)} ranges > limit {max_tensors}")
    out: Ranges = {}
    for name, value in report.items():
        if not isinstance(name, str) or not 0 < len(name) <= _MAX_NAME:
            raise ProtocolError(_REASON, f"tensor name must be a short string, got {name!r:.80}")
        if name not in allowed:
            raise ProtocolError(_REASON, f"model has no calibrated activation {name!r}")
        out[name] = _pair(name, value)
    return out


def merge_ranges(
    reports: Iterable[Mapping[str, tuple[float, float]]],
    previous: Mapping[str, tuple[float, float]] | None = None,
    *,
    trim: float = TRIM,
    growth: float = GROWTH,
) -> Ranges:
    """The robust merge of already validated reports (module docstring), sorted by name."""
    lows: dict[str, list[float]] = {}
    highs: dict[str, list[float]] = {}
    for report in reports:
        for name, (low, high) in report.items():
            lows.setdefault(name, []).append(low)
            highs.setdefault(name, []).append(high)
    merged: Ranges = {}
    for name in sorted(lows):
        lo_sorted, hi_sorted = sorted(lows[name]), sorted(highs[name])
        n = len(lo_sorted)
        t = min(math.ceil(trim * n), (n - 1) // 2)
        low, high = lo_sorted[t], hi_sorted[n - 1 - t]
        if previous is not None and name in previous:
            low, high = _bounded(low, high, previous[name], growth)
        merged[name] = (low, high)
    return merged


def _bounded(
    low: float, high: float, before: tuple[float, float], growth: float
) -> tuple[float, float]:
    b_low, b_high = before
    slack = growth * max(b_high - b_low, abs(b_high), abs(b_low), 1e-6)
    floor, ceiling = b_low - slack, b_high + slack
    low = min(max(low, floor), ceiling)
    high = min(max(high, floor), ceiling)
    return (low, max(low, high))


class RangeMerger:
    """The streaming form for one round: `add` each device's report as it arrives.

    ``previous``: the ranges the previous version's int8 model was built from (each bound
    then moves at most ``growth`` widths per version); None for the first one.
    """

    def __init__(
        self,
        allowed: Iterable[str],
        *,
        max_tensors: int = MAX_CALIB_TENSORS,
        previous: Mapping[str, tuple[float, float]] | None = None,
    ) -> None:
        self._allowed = frozenset(allowed)
        if not self._allowed:
            raise ValueError("a model with no calibrated activation cannot merge ranges")
        self._max_tensors = max_tensors
        self._previous = dict(previous) if previous else None
        self._reports: list[Ranges] = []

    def add(self, report: object) -> None:
        """Validate and keep one report; on `ProtocolError` the merged state is unchanged."""
        self._reports.append(validate_ranges(report, self._allowed, max_tensors=self._max_tensors))

    @property
    def reports(self) -> int:
        """Reports folded so far."""
        return len(self._reports)

    def merged(self) -> Ranges:
        """The robust merge of the reports so far, sorted by name."""
        return merge_ranges(self._reports, self._previous)


@dataclass(frozen=True)
class Int8Build:
    """The int8 model of one version, or why there is none (then publish fp32 only)."""

    onnx: bytes | None
    skipped: str | None = None
    tensors: int = 0


def build_int8(fp32_onnx: bytes, ranges: Mapping[str, tuple[float, float]] | None) -> Int8Build:
    """Quantize `fp32_onnx` with the merged ranges of a round; never raises for missing ranges.

    No ranges, or ranges that miss an activation (devices calibrated another architecture),
    give `Int8Build(onnx=None, skipped=reason)` and a warning in the log. Invalid ranges are a
    bug upstream (they were validated on arrival) and still raise ValueError.
    """
    if not ranges:
        reason = "no device reported calibration ranges"
        log.warning("int8 model skipped: %s; publishing fp32 only", reason)
        return Int8Build(None, reason)
    try:
        onnx = quantize_int8(fp32_onnx, ranges)
    except MissingRanges as exc:
        reason = f"calibration incomplete: {exc}"
        log.warning("int8 model skipped: %s; publishing fp32 only", reason)
        return Int8Build(None, reason)
    return Int8Build(onnx, None, len(ranges))


def _pair(name: str, value: object) -> tuple[float, float]:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ProtocolError(_REASON, f"range of {name!r} must be [min, max]")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        raise ProtocolError(_REASON, f"range of {name!r} must hold two numbers")
    low, high = float(value[0]), float(value[1])
    finite32 = math.isfinite(low) and math.isfinite(high)
    finite32 = finite32 and max(abs(low), abs(high)) <= float(np.finfo(np.float32).max)
    if not finite32:
        raise ProtocolError(_REASON, f"range of {name!r} is not finite in float32: {value!r:.80}")
    if low > high:
        raise ProtocolError(_REASON, f"range of {name!r} has min {low} > max {high}")
    return (low, high)
