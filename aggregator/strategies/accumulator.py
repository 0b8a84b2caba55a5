"""A streaming weighted sum: memory O(model), whatever the number of updates folded.

Two precisions (``bench/aggregate``, ``docs/benchmarks.md`` has the numbers):

- ``float32`` (what the strategies use): ``np.multiply(delta, w, out=scratch)`` then
  ``np.add(sum, scratch, out=sum)``, no allocation per update. It runs near memory-copy speed;
  float64 needs a widening cast per element and ran at about a third of it. Its rounding error
  grows with the number of updates N like ``sqrt(N) * 2**-24`` relative to the summed terms;
  for FL deltas (small next to the weights they are added to) that is far below the float32
  rounding of ``weights + step`` itself. Retained memory: sum + scratch = 8 bytes/parameter.
- ``float64`` (the default of this class, exact for cancelling magnitudes such as
  ``1e8 + 1 - 1e8``): a temporary per update, retained memory 8 bytes/parameter.

Either way an update whose weighted values are not finite is refused with
``AggregationError`` before anything is added, so one bad update never poisons a round.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedge.clipping import squared_norm
from fedge.errors import AggregationError
from fedge.tensors import TensorSpec

# squared_norm lives in fedge.clipping; re-exported here for the code that imports it from here.
__all__ = ["FULL_SCRATCH_MAX", "WeightedSum", "squared_norm"]


_F32_MAX = float(np.finfo(np.float32).max)
FULL_SCRATCH_MAX = 4 << 20
"""Models up to this many parameters get a model-sized scratch; larger ones are streamed."""
_CHUNK = 1 << 16


def _views(flat: np.ndarray, spec: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    out, off = {}, 0
    for k, s in spec.items():
        n = math.prod(s)
        out[k] = flat[off : off + n].reshape(s)
        off += n
    return out


class WeightedSum:
    """Accumulates ``sum_i w_i * scale_i * delta_i`` and ``sum_i w_i``."""

    def __init__(
        self,
        spec: TensorSpec,
        dtype: type[np.floating] | np.dtype = np.float64,
        *,
        full_scratch_max: int = FULL_SCRATCH_MAX,
    ) -> None:
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"accumulator dtype must be float32 or float64, got {self.dtype}")
        self.spec = {k: tuple(s) for k, s in spec.items()}
        size = sum(math.prod(s) for s in self.spec.values())
        self.total_weight = 0.0
        self.count = 0
        if self.dtype == np.float64:
            self.sums = {k: np.zeros(s, dtype=self.dtype) for k, s in self.spec.items()}
            return
        # float32: one flat sum with the tensors as views, so the add is one call.
        self._flat_sums = np.zeros(size, np.float32)
        self.sums = _views(self._flat_sums, self.spec)
        self._streamed = size > full_scratch_max
        # A model-sized scratch is fastest while sum + scratch stay in the CPU's cache; past
        # that, slabs of _CHUNK elements keep the scratch in L2 and halve the memory traffic.
        self._flat_scratch = np.empty(min(size, _CHUNK) if self._streamed else size, np.float32)
        self._scratch = {} if self._streamed else _views(self._flat_scratch, self.spec)

    def add(
        self,
        delta: Mapping[str, np.ndarray],
        weight: float,
        *,
        scale: float = 1.0,
        sq_norm: float | None = None,
    ) -> None:
        """Add ``weight * scale * delta`` to the sum and ``weight`` to the total weight.

        ``sq_norm``: ``squared_norm(delta)`` when the caller has it already (finite by
        construction); spares one read of the update on the streamed path.
        """
        if not (weight > 0 and math.isfinite(weight)):
            raise AggregationError(f"update weight must be > 0, got {weight}")
        if not (scale > 0 and math.isfinite(scale)):
            raise AggregationError(f"update scale must be > 0, got {scale}")
        factor = weight * scale
        with np.errstate(over="ignore", invalid="ignore"):
            if self.dtype == np.float64:
                self._add64(delta, factor)
            elif self._streamed:
                self._add32_streamed(delta, factor, sq_norm)
            else:
                self._add32(delta, factor)
        self.total_weight += weight
        self.count += 1

    def _add64(self, delta: Mapping[str, np.ndarray], factor: float) -> None:
        terms = {k: np.asarray(delta[k], np.float64) * factor for k in self.sums}
        if not all(np.isfinite(t).all() for t in terms.values()):
            raise AggregationError("update is not finite (NaN, Inf or overflow)")
        for k, acc in self.sums.items():
            acc += terms[k]

    def _add32(self, delta: Mapping[str, np.ndarray], factor: float) -> None:
        f32 = np.float32(factor)
        for k, buf in self._scratch.items():
            np.multiply(delta[k], f32, out=buf, casting="same_kind")
        # NaN and Inf propagate through a dot product: a finite result means every value is
        # finite (a float32 overflow of the squares is re-checked exactly). BLAS sdot costs
        # ~0.15 of a copy; np.sum's pairwise loop cost ~1.
        flat = self._flat_scratch
        if not math.isfinite(float(np.dot(flat, flat))) and not np.isfinite(flat).all():
            raise AggregationError("update is not finite (NaN, Inf or overflow)")
        np.add(self._flat_sums, flat, out=self._flat_sums)

    def _add32_streamed(
        self, delta: Mapping[str, np.ndarray], factor: float, sq: float | None
    ) -> None:
        # Check the whole update before touching the sum: |x_j| <= ||x||, so a finite norm
        # times the factor below float32's max means no weighted value can overflow either.
        sq = squared_norm(delta) if sq is None else sq
        if not math.sqrt(sq) * factor < _F32_MAX:
            raise AggregationError("update is not finite (NaN, Inf or overflow)")
        f32, buf = np.float32(factor), self._flat_scratch
        for k, acc in self.sums.items():
            src, dst = np.asarray(delta[k]).reshape(-1), acc.reshape(-1)
            for i in range(0, dst.size, buf.size):
                j = min(i + buf.size, dst.size)
                t, d = buf[: j - i], dst[i:j]
                np.multiply(src[i:j], f32, out=t, casting="same_kind")
                np.add(d, t, out=d)

    def add_sum(self, sums: Mapping[str, np.ndarray], total_weight: float, count: int) -> None:
        """Add a share summed elsewhere (a shard worker's partial): ``sums`` are already
        ``sum_i w_i * scale_i * delta_i`` over ``count`` updates of total weight
        ``total_weight``. Refused whole, before anything is added, unless it is finite and of
        this sum's tensors and shapes."""
        if sums.keys() != self.sums.keys():
            raise AggregationError(f"partial tensors {list(sums)} != {list(self.sums)}")
        if not (total_weight > 0 and math.isfinite(total_weight)) or count < 1:
            raise AggregationError(
                f"partial needs total_weight > 0 and count >= 1, got {total_weight}, {count}"
            )
        for k, acc in self.sums.items():
            a = np.asarray(sums[k])
            if a.shape != acc.shape:
                raise AggregationError(f"{k}: partial shape {a.shape} != {acc.shape}")
            if not np.isfinite(a).all():
                raise AggregationError(f"partial tensor {k} contains NaN or Inf")
        with np.errstate(over="ignore"):
            for k, acc in self.sums.items():
                acc += np.asarray(sums[k], self.dtype)
        self.total_weight += float(total_weight)
        self.count += int(count)

    def mean(self) -> dict[str, np.ndarray]:
        if self.count == 0:
            raise AggregationError("no updates to average")
        # Overflow to inf in the float32 cast is caught by the caller's finiteness check.
        with np.errstate(over="ignore"):
            return {k: (v / self.total_weight).astype(np.float32) for k, v in self.sums.items()}
