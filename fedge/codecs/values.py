"""Value codecs: how the numbers of one tensor (or of the kept entries of a sparse one) travel.

A value codec turns a float tensor into the *value fields* of a record and back. Dense records
(``fedge.codecs.quant``) and sparse records (``fedge.codecs.sparse``) both end with them.

============  ====  ======================================  ===================================
value codec   tag   value fields (msgpack)                  precision
============  ====  ======================================  ===================================
``fp32``      <f4   data: bin, n x binary32 LE              exact
``fp16``      <f2   data: bin, n x binary16 LE              as the dense fp16 codec
``int8``      q8    scales: bin, data: bin (n x int8)       ``|x^ - x| < s_c`` (stochastic)
``int4``      q4    scales: bin, data: bin (ceil(n/2))      ``|x^ - x| < s_c`` (stochastic)
============  ====  ======================================  ===================================

Quantized layout (``q8`` and ``q4``), for a tensor of shape ``shape`` with ``n`` elements:

- Channels: rank >= 2 -> ``C = shape[0]`` channels (the output channel of a weight), each
  the ``n / C`` consecutive elements of one row in C order; rank 0 or 1 -> ``C = 1``.
- ``scales``: ``C`` little-endian IEEE 754 binary32 values, 4·C bytes; each MUST be finite and
  ``>= 0`` (else ``bad_scale``).
- ``q8`` data: ``n`` bytes, two's-complement int8 in C order, each in [-127, 127]
  (-128 is refused: ``bad_tensor``).
- ``q4`` data: ``ceil(n / 2)`` bytes; element ``2i`` is the low nibble of byte ``i`` and
  element ``2i + 1`` its high nibble; a nibble is a 4-bit two's-complement integer in [-7, 7]
  (nibble ``0x8`` = -8 is refused). When ``n`` is odd the last high nibble MUST be 0.
- Value: ``x^ = float32(q) * scales[c]``, computed in binary32 (round to nearest even).
  A decoded value that is not finite is refused (``non_finite``).

What fedge's encoder does (a receiver does not depend on it): clip ``x`` to ±2^127 (so that
``Q·s`` stays finite), ``s_c`` = the smallest binary32 ``>= max|x_c| / Q`` (``Q`` = 127 for
int8, 7 for int4; 0 for an all-zero channel), then ``q = floor(x / s_c + u)`` with ``u``
uniform in [0, 1) drawn independently per element. ``E[q · s_c] = x`` exactly (stochastic
rounding is unbiased) and ``|q · s_c - x| < s_c``, up to binary32 rounding of the product.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedge.errors import ProtocolError

__all__ = ["VALUES", "FloatValues", "QuantValues", "ValueCodec", "num_channels"]

_CLIP = 2.0**127
_F32_INF = np.float32(np.inf)


def num_channels(shape: tuple[int, ...]) -> int:
    """Scales per tensor: one per output channel (first axis) of rank >= 2, else one."""
    return shape[0] if len(shape) >= 2 else 1


def _bin(value: Any, what: str) -> bytes:
    if not isinstance(value, bytes):
        raise ProtocolError("schema", f"{what} must be bin")
    return value


class FloatValues:
    """``fp32`` / ``fp16`` values: raw little-endian IEEE 754."""

    fields = 1
    lossless: bool

    def __init__(self, name: str, dtype: str) -> None:
        self.name = name
        self.tag = dtype
        self._dtype = np.dtype(dtype)
        self.lossless = name == "fp32"

    def data_len(self, n: int) -> int:
        return n * self._dtype.itemsize

    def encode_fields(self, a: np.ndarray, rng: np.random.Generator | None = None) -> list[Any]:
        a = np.asarray(a)
        if self.tag == "<f2":
            # Beyond fp16 range a value would become inf; clip so the update stays finite.
            limit = float(np.finfo(np.float16).max)
            a = np.clip(a, -limit, limit)
        return [np.asarray(a, dtype=self._dtype).tobytes(order="C")]

    def decode_fields(self, fields: list[Any], shape: tuple[int, ...], what: str) -> np.ndarray:
        data = _bin(fields[0], f"{what}: data")
        want = self.data_len(math.prod(shape))
        if len(data) != want:
            raise ProtocolError("bad_tensor", f"{what}: {len(data)} data bytes, expected {want}")
        return np.frombuffer(data, dtype=self._dtype).astype(np.float32).reshape(shape)


class QuantValues:
    """``int8`` / ``int4``: symmetric per-channel scales, stochastic rounding."""

    fields = 2
    lossless = False

    def __init__(self, name: str, tag: str, bits: int) -> None:
        self.name = name
        self.tag = tag
        self.bits = bits
        self.qmax = 2 ** (bits - 1) - 1

    def data_len(self, n: int) -> int:
        return n if self.bits == 8 else (n + 1) // 2

    # -- encode ---------------------------------------------------------------------------
    def quantize(
        self, a: np.ndarray, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``a`` -> (int8 codes of a's shape, float32 scales per channel)."""
        x = np.asarray(a, dtype=np.float64)
        if not np.isfinite(x).all():
            raise ValueError(f"{self.name}: cannot quantize NaN or Inf")
        shape = x.shape
        c = num_channels(shape)
        rows = np.clip(x, -_CLIP, _CLIP).reshape(c, math.prod(shape) // c if c else 0)
        bound = np.abs(rows).max(axis=1, initial=0.0) / self.qmax
        scales = bound.astype(np.float32)
        low = scales.astype(np.float64) < bound
        scales[low] = np.nextafter(scales[low], _F32_INF)  # round up: |x / s| <= qmax
        s = scales.astype(np.float64)[:, None]
        y = np.divide(rows, s, out=np.zeros_like(rows), where=s > 0)
        rng = rng if rng is not None else np.random.default_rng()
        q = np.floor(y + rng.random(y.shape))
        q = np.clip(q, -self.qmax, self.qmax).astype(np.int8)
        return q.reshape(shape), scales

    def encode_fields(self, a: np.ndarray, rng: np.random.Generator | None = None) -> list[Any]:
        q, scales = self.quantize(a, rng)
        flat = q.reshape(-1)
        if self.bits == 8:
            data = flat.tobytes()
        else:
            nib = (flat.astype(np.uint8) & 0x0F).astype(np.uint8)
            if len(nib) % 2:
                nib = np.append(nib, np.uint8(0))
            data = (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8).tobytes()
        return [scales.astype("<f4").tobytes(), data]

    # -- decode ---------------------------------------------------------------------------
    def decode_fields(self, fields: list[Any], shape: tuple[int, ...], what: str) -> np.ndarray:
        raw_scales = _bin(fields[0], f"{what}: scales")
        data = _bin(fields[1], f"{what}: data")
        c, n = num_channels(shape), math.prod(shape)
        if len(raw_scales) != 4 * c:
            raise ProtocolError(
                "bad_tensor", f"{what}: {len(raw_scales)} scale bytes, expected {4 * c}"
            )
        if len(data) != self.data_len(n):
            raise ProtocolError(
                "bad_tensor", f"{what}: {len(data)} data bytes, expected {self.data_len(n)}"
            )
        scales = np.frombuffer(raw_scales, dtype="<f4").astype(np.float32)
        if not (np.isfinite(scales).all() and (scales >= 0).all()):
            raise ProtocolError("bad_scale", f"{what}: scales must be finite and >= 0")
        q = self._codes(data, n, what)
        with np.errstate(over="ignore"):  # a peer's huge scale: caught by the finite check
            rows = q.astype(np.float32).reshape(c, n // c if c else 0) * scales[:, None]
        return rows.reshape(shape)

    def _codes(self, data: bytes, n: int, what: str) -> np.ndarray:
        if self.bits == 8:
            q = np.frombuffer(data, dtype=np.int8)
            if (q == -128).any():
                raise ProtocolError("bad_tensor", f"{what}: int8 code -128 is not allowed")
            return q
        b = np.frombuffer(data, dtype=np.uint8)
        nib = np.empty(2 * len(b), dtype=np.uint8)
        nib[0::2], nib[1::2] = b & 0x0F, b >> 4
        if len(nib) > n and nib[-1] != 0:
            raise ProtocolError("bad_tensor", f"{what}: int4 padding nibble must be 0")
        nib = nib[:n]
        if (nib == 8).any():
            raise ProtocolError("bad_tensor", f"{what}: int4 code -8 is not allowed")
        return nib.astype(np.int8) - np.where(nib >= 8, np.int8(16), np.int8(0))


ValueCodec = FloatValues | QuantValues

VALUES: dict[str, ValueCodec] = {
    "fp32": FloatValues("fp32", "<f4"),
    "fp16": FloatValues("fp16", "<f2"),
    "int8": QuantValues("int8", "q8", 8),
    "int4": QuantValues("int4", "q4", 4),
}
