"""Delta codecs, named by the round task and composed with ``+``.

Grammar (case-insensitive, surrounding spaces ignored)::

    codec    = [ "topk:" FRACTION "+" ] value [ "+zstd" ]
    value    = "fp32" | "fp16" | "int8" | "int4"
    FRACTION = decimal in (0, 1], e.g. 0.05, .1, 1e-2

``topk:F`` alone means ``topk:F+fp32``. The canonical name (``codec.name``, what the round
task carries and the update echoes) writes the fraction as Python's shortest round-tripping
float repr and always names the value codec: ``topk:0.05+int8+zstd``, ``topk:0.01+fp32``;
``parse_codec(codec.name).name == codec.name``.

``parse_codec`` returns an object with ``encode(delta, rng=None) -> bytes`` and
``decode(blob, spec, limits) -> {name: float32 array}`` (bounded and validated; errors are
``ProtocolError``), plus ``lossless``: whether ``decode(encode(x)) == x`` always holds (only
``fp32`` and ``fp32+zstd``), which tells a device whether it needs an error-feedback residual.

Blob layouts: ``fedge.tensors`` (dense ``fp32``/``fp16`` records), ``fedge.codecs.quant``
(``int8``/``int4`` records), ``fedge.codecs.values`` (scales, int8/int4 codes),
``fedge.codecs.sparse`` (``topk`` records), ``fedge.codecs.zstd_frame`` (``+zstd``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Protocol

import numpy as np

from fedge.codecs.dense import DenseCodec
from fedge.codecs.quant import QuantCodec
from fedge.codecs.sparse import TopKCodec
from fedge.codecs.values import VALUES, QuantValues
from fedge.codecs.zstd_frame import compress, decompress_capped
from fedge.errors import InvalidValue
from fedge.limits import Limits
from fedge.tensors import TensorSpec

__all__ = ["VALUE_CODECS", "Codec", "masked_codec", "parse_codec"]


class Codec(Protocol):
    name: str
    lossless: bool

    def encode(
        self, delta: Mapping[str, np.ndarray], rng: np.random.Generator | None = None
    ) -> bytes: ...

    def decode(self, blob: bytes, spec: TensorSpec, limits: Limits) -> dict[str, np.ndarray]: ...

    def max_blob_bytes(self, spec: TensorSpec) -> int: ...


VALUE_CODECS = ("fp32", "fp16", "int8", "int4")

_FRACTION = re.compile(r"(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?")


def _dense(value: str) -> Codec:
    if value == "fp32":
        return DenseCodec("fp32", "<f4")
    if value == "fp16":
        return DenseCodec("fp16", "<f2")
    values = VALUES[value]
    assert isinstance(values, QuantValues)
    return QuantCodec(values)


class _Zstd:
    """Wraps a codec's bytes in a size-declared zstd frame."""

    def __init__(self, inner: Codec) -> None:
        self.inner = inner
        self.name = f"{inner.name}+zstd"
        self.lossless = inner.lossless

    def encode(
        self, delta: Mapping[str, np.ndarray], rng: np.random.Generator | None = None
    ) -> bytes:
        return compress(self.inner.encode(delta, rng))

    def max_blob_bytes(self, spec: TensorSpec) -> int:
        # A frame of incompressible data is a little longer than its content.
        inner = self.inner.max_blob_bytes(spec)
        return inner + inner // 128 + 1024

    def decode(self, blob: bytes, spec: TensorSpec, limits: Limits) -> dict[str, np.ndarray]:
        # The cap is what this codec can validly write for this model, so a frame declaring
        # more is refused before anything is inflated: a bomb costs about one model's
        # worth of memory, not the global 256 MiB (issue 17, attack 4).
        cap = min(limits.max_decompressed_bytes, self.inner.max_blob_bytes(spec))
        return self.inner.decode(decompress_capped(blob, cap), spec, limits)


def _unknown(spec: object, why: str = "") -> InvalidValue:
    return InvalidValue(
        f"unknown codec {spec!r}{why}; use [topk:FRACTION+]VALUE[+zstd] with VALUE one of "
        f"{', '.join(VALUE_CODECS)} (e.g. fp16+zstd, int8+zstd, topk:0.05+int8+zstd)"
    )


def parse_codec(spec: str) -> Codec:
    """``"topk:0.05+int8+zstd"`` -> codec; ``InvalidValue`` naming the valid choices otherwise."""
    if not isinstance(spec, str):
        raise _unknown(spec)
    parts = spec.strip().lower().split("+")
    zstd = parts[-1] == "zstd"
    if zstd:
        parts = parts[:-1]
    fraction = None
    if parts and parts[0].startswith("topk:"):
        text = parts.pop(0)[len("topk:") :].strip()
        if not _FRACTION.fullmatch(text) or not 0 < float(text) <= 1:
            raise _unknown(spec, ": the topk fraction must be a number in (0, 1]")
        fraction = float(text)
        if not parts:
            parts = ["fp32"]
    if len(parts) != 1 or parts[0] not in VALUE_CODECS:
        raise _unknown(spec)
    value = parts[0]
    codec: Codec = _dense(value) if fraction is None else TopKCodec(fraction, VALUES[value])
    return _Zstd(codec) if zstd else codec


_TOPK_NAME = re.compile(r"topk:([^+]+)\+(.+)")


def masked_codec(codec: Codec, full: int, live: int) -> Codec:
    """The codec a device encodes the ``live`` entries of a masked delta with (of a
    ``full``-entry model): a top-k budget is a fraction of the model, not of its live weights.

    ``topk:F`` keeps ``ceil(F·N)`` of the ``N`` entries it is given. Under a pruning mask only
    the live entries are encoded (``fedge.masks.live``); taken of those, the budget would
    shrink with the sparsity and every round would teach the pruned model less than the
    dense one (digits, ``structured:0.5``: 131 entries a round against the dense run's 270,
    1.0 point lower; docs/benchmarks.md "Federated pruning"). So the fraction applied is
    ``min(1, F · full / live)``: as many entries as an unmasked update, at most every live
    one. Wire-compatible (a receiver takes any valid ``k`` and bounds a blob by every entry
    kept). Any other codec, or nothing masked: ``codec`` itself."""
    m = _TOPK_NAME.fullmatch(codec.name)
    if m is None or not 0 < live < full:
        return codec
    return parse_codec(f"topk:{min(1.0, float(m.group(1)) * full / live)!r}+{m.group(2)}")
