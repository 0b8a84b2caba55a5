"""Delta codecs, named by the round task and composed with ``+``.

A spec is a value codec optionally followed by ``+zstd``: ``fp32``, ``fp16``, ``fp16+zstd``.
``parse_codec`` returns an object with ``encode(delta) -> bytes`` and
``decode(blob, spec, limits) -> {name: float32 array}``; decoding is bounded and validated.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np

from fedge.codecs.dense import DenseCodec
from fedge.codecs.zstd_frame import compress, decompress_capped
from fedge.limits import Limits
from fedge.tensors import TensorSpec

__all__ = ["VALUE_CODECS", "Codec", "parse_codec"]


class Codec(Protocol):
    name: str

    def encode(self, delta: Mapping[str, np.ndarray]) -> bytes: ...

    def decode(self, blob: bytes, spec: TensorSpec, limits: Limits) -> dict[str, np.ndarray]: ...


VALUE_CODECS = {
    "fp32": lambda: DenseCodec("fp32", "<f4"),
    "fp16": lambda: DenseCodec("fp16", "<f2"),
}


class _Zstd:
    """Wraps a value codec's bytes in a size-declared zstd frame."""

    def __init__(self, inner: Codec) -> None:
        self.inner = inner
        self.name = f"{inner.name}+zstd"

    def encode(self, delta: Mapping[str, np.ndarray]) -> bytes:
        return compress(self.inner.encode(delta))

    def decode(self, blob: bytes, spec: TensorSpec, limits: Limits) -> dict[str, np.ndarray]:
        return self.inner.decode(
            decompress_capped(blob, limits.max_decompressed_bytes), spec, limits
        )


def parse_codec(spec: str) -> Codec:
    """``"fp16+zstd"`` -> codec; ``ValueError`` naming the valid choices otherwise."""
    parts = spec.strip().lower().split("+") if isinstance(spec, str) else []
    zstd = bool(parts) and parts[-1] == "zstd"
    if zstd:
        parts = parts[:-1]
    if len(parts) != 1 or parts[0] not in VALUE_CODECS:
        raise ValueError(
            f"unknown codec {spec!r}; use one of {', '.join(VALUE_CODECS)}, optionally + 'zstd' "
            "(e.g. fp16+zstd)"
        )
    codec: Codec = VALUE_CODECS[parts[0]]()
    return _Zstd(codec) if zstd else codec
