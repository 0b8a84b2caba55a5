"""Federated calibration: merge the activation ranges devices report, build the int8 model.

Each device reports {activation name: (min, max)} measured on its own samples through the
round's global model (`edge_agent.calibration.compute_ranges`). Merging takes the min of the
mins and the max of the maxes, with no weighting: that is exactly the range onnxruntime's
MinMax calibrator would find on the union of all the devices' samples. The merge is also
idempotent, so a QoS 1 duplicate of a report changes nothing.

Reports come from the network, so each is validated whole before it counts (`ProtocolError`
with reason ``bad_calibration`` otherwise, and the merged state is left untouched): a map of
at most `max_tensors` names, each an activation the model calibrates, each a pair of finite
float32 numbers with min <= max.

A single device can still widen a range on purpose (a huge max coarsens that activation's grid
for everyone); robust merges (e.g. a quantile of the reported maxima) would need more than one
number per device and are not done here.

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
    "MAX_CALIB_TENSORS",
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


def merge_ranges(reports: Iterable[Mapping[str, tuple[float, float]]]) -> Ranges:
    """Min of mins and max of maxes per name, over already validated reports."""
    merged: Ranges = {}
    for report in reports:
        for name, (low, high) in report.items():
            if name in merged:
                old_low, old_high = merged[name]
                merged[name] = (min(old_low, low), max(old_high, high))
            else:
                merged[name] = (low, high)
    return dict(sorted(merged.items()))


class RangeMerger:
    """The streaming form for one round: `add` each device's report as it arrives.

    Memory is O(activations), whatever the number of devices.
    """

    def __init__(self, allowed: Iterable[str], *, max_tensors: int = MAX_CALIB_TENSORS) -> None:
        self._allowed = frozenset(allowed)
        if not self._allowed:
            raise ValueError("a model with no calibrated activation cannot merge ranges")
        self._max_tensors = max_tensors
        self._merged: Ranges = {}
        self._reports = 0

    def add(self, report: object) -> None:
        """Validate and fold one report; on `ProtocolError` the merged state is unchanged."""
        ranges = validate_ranges(report, self._allowed, max_tensors=self._max_tensors)
        self._merged = merge_ranges([self._merged, ranges])
        self._reports += 1

    @property
    def reports(self) -> int:
        """Reports folded so far (a duplicate counts again, but cannot change the ranges)."""
        return self._reports

    def merged(self) -> Ranges:
        """A copy of the merged ranges, sorted by name."""
        return dict(self._merged)


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
