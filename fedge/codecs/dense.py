"""Dense value codecs: every element sent, as float32 or float16."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedge.limits import Limits
from fedge.tensors import TensorSpec, decode_records, dense_record, encode_records

__all__ = ["DenseCodec"]


class DenseCodec:
    """``fp32`` (exact) or ``fp16`` (relative error <= 2^-11 within fp16 range)."""

    def __init__(self, name: str, dtype: str) -> None:
        self.name = name
        self._dtype = dtype
        self.lossless = dtype == "<f4"

    def encode(
        self, delta: Mapping[str, np.ndarray], rng: np.random.Generator | None = None
    ) -> bytes:
        """``rng`` is unused: rounding to fp16 is deterministic (nearest even)."""
        if self._dtype == "<f2":
            # Values beyond fp16 range would become inf; clip so the update stays finite.
            limit = float(np.finfo(np.float16).max)
            delta = {k: np.clip(v, -limit, limit) for k, v in delta.items()}
        return encode_records([dense_record(k, v, self._dtype) for k, v in delta.items()])

    def max_blob_bytes(self, spec: TensorSpec) -> int:
        """The largest valid blob for ``spec`` (fedge.codecs.bounds)."""
        from fedge.codecs.bounds import dense_bound
        from fedge.codecs.values import VALUES

        return dense_bound(spec, VALUES[self.name])

    def decode(self, blob: bytes, spec: TensorSpec, limits: Limits) -> dict[str, np.ndarray]:
        return decode_records(blob, spec, (self._dtype,), limits)
