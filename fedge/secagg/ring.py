"""Weighted values in the ring Z/2^B, and their tight bit packing.

A device with delta ``x`` (flattened) and sample count ``n`` sends ``m + 1`` ring elements:
``q_k = SR(w * clip(x_k, -c, c) / c * L)`` for each parameter and ``q_m = SR(w * L)``, where
``w = min(n, W) / W`` (``W`` the round's ``weight_cap``), ``L = 2^(b-1) - 1`` (``b`` value bits),
``SR`` stochastic rounding (``floor(v + u)``, ``u`` uniform in [0, 1): unbiased) and negative
values taken modulo ``2^B``. Each ``|q| <= L``, so the sum of at most ``2^h`` devices lies in
``(-2^(B-1), 2^(B-1))`` with ``B = b + h``: it never wraps, and the centred sum decodes to
``sum_i w_i x_i`` and ``sum_i w_i`` exactly as the plain sum of the same integers would.

Packing: element k occupies bits ``[k*B, (k+1)*B)`` of a little-endian bit stream (bit j of the
stream is bit ``j % 8`` of byte ``j // 8``), least significant bit first; the unused high bits
of the last byte are zero. ``m`` elements take ``ceil(m * B / 8)`` bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from fedge.errors import InvalidValue, ProtocolError

__all__ = [
    "MAX_RING_BITS",
    "RingSpec",
    "flat_order",
    "flatten",
    "pack_bits",
    "unflatten",
    "unpack_bits",
]

MAX_RING_BITS = 32  # the PRG draws 32-bit words; B must divide into them


@dataclass(frozen=True)
class RingSpec:
    """The round's quantization: ``value_bits`` (b), ``headroom_bits`` (h), ``clip`` (c),
    ``weight_cap`` (W)."""

    value_bits: int
    headroom_bits: int
    clip: float
    weight_cap: int

    def __post_init__(self) -> None:
        if not 2 <= self.value_bits <= 24:
            raise InvalidValue(f"value_bits must be in [2, 24], got {self.value_bits}")
        if self.headroom_bits < 0 or self.bits > MAX_RING_BITS:
            raise InvalidValue(
                f"value_bits + headroom_bits must be at most {MAX_RING_BITS}, got {self.bits}"
            )
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise InvalidValue(f"clip must be a positive number, got {self.clip}")
        if self.weight_cap < 1:
            raise InvalidValue(f"weight_cap must be >= 1, got {self.weight_cap}")

    @classmethod
    def for_devices(cls, value_bits: int, devices: int, clip: float, weight_cap: int) -> RingSpec:
        """The smallest ring that holds the sum of ``devices`` inputs without overflow."""
        return cls(value_bits, max(0, math.ceil(math.log2(max(devices, 1)))), clip, weight_cap)

    @property
    def bits(self) -> int:
        return self.value_bits + self.headroom_bits

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    @property
    def levels(self) -> int:
        return (1 << (self.value_bits - 1)) - 1

    @property
    def max_inputs(self) -> int:
        return 1 << self.headroom_bits

    def packed_bytes(self, count: int) -> int:
        return (count * self.bits + 7) // 8

    def encode(self, delta: np.ndarray, num_samples: int, rng: np.random.Generator) -> np.ndarray:
        """The ``m + 1`` ring elements (uint64) of one device's weighted, clipped delta."""
        w = min(max(int(num_samples), 0), self.weight_cap) / self.weight_cap
        x = np.asarray(delta, np.float64).ravel()
        if not np.isfinite(x).all():  # before clipping, which would make an Inf finite
            raise InvalidValue("delta is not finite")
        x = np.clip(x, -self.clip, self.clip)
        scaled = np.append(x * (w * self.levels / self.clip), w * self.levels)
        q = np.floor(scaled + rng.random(scaled.shape)).astype(np.int64)
        return (q % self.modulus).astype(np.uint64)

    def add(self, acc: np.ndarray, values: np.ndarray) -> None:
        """``acc += values`` in the ring, in place."""
        np.add(acc, values, out=acc)
        np.bitwise_and(acc, np.uint64(self.modulus - 1), out=acc)

    def sub(self, acc: np.ndarray, values: np.ndarray) -> None:
        """``acc -= values`` in the ring, in place."""
        np.subtract(acc, values, out=acc)  # uint64 wraps modulo 2^64, a multiple of 2^B
        np.bitwise_and(acc, np.uint64(self.modulus - 1), out=acc)

    def centred(self, ring_sum: np.ndarray) -> np.ndarray:
        """Ring elements as signed integers in ``[-2^(B-1), 2^(B-1))``."""
        s = np.asarray(ring_sum, np.int64)
        return np.where(s >= self.modulus // 2, s - self.modulus, s)

    def decode_sum(self, ring_sum: np.ndarray) -> tuple[np.ndarray, float]:
        """``(sum_i w_i x_i, sum_i w_i)`` from the unmasked ring sum of ``m + 1`` elements."""
        c = self.centred(ring_sum)
        values = c[:-1].astype(np.float64) * (self.clip / self.levels)
        return values, float(c[-1]) / self.levels


def flat_order(names: Iterable[str]) -> list[str]:
    """Tensor names in the order their values sit in the ring vector: UTF-8 byte order, each
    tensor row-major."""
    return sorted(names, key=lambda k: k.encode())


def flatten(tensors: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.ravel(tensors[k]) for k in flat_order(tensors)])


def unflatten(flat: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    out, at = {}, 0
    for name in flat_order(shapes):
        size = math.prod(shapes[name])
        out[name] = flat[at : at + size].reshape(shapes[name])
        at += size
    return out


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Each value's low ``bits`` bits, back to back (layout in the module docstring)."""
    v = np.ascontiguousarray(np.asarray(values, np.uint64).astype("<u8"))
    if v.size and int(v.max()) >> bits:
        raise InvalidValue(f"a value does not fit in {bits} bits")
    stream = np.unpackbits(v.view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
    return np.packbits(stream[:, :bits].reshape(-1), bitorder="little").tobytes()


def unpack_bits(blob: bytes, bits: int, count: int) -> np.ndarray:
    """The inverse of ``pack_bits``: exactly ``ceil(count * bits / 8)`` bytes, zero padding."""
    need = (count * bits + 7) // 8
    if len(blob) != need:
        raise ProtocolError("schema", f"packed vector is {len(blob)} bytes, expected {need}")
    stream = np.unpackbits(np.frombuffer(blob, np.uint8), bitorder="little")
    if stream[count * bits :].any():
        raise ProtocolError("schema", "packed vector has non-zero padding bits")
    elems = np.zeros((count, 64), np.uint8)
    elems[:, :bits] = stream[: count * bits].reshape(count, bits)
    return np.packbits(elems, axis=1, bitorder="little").view("<u8").ravel().astype(np.uint64)
