"""Shamir t-of-n secret sharing of 32-byte secrets over GF(P), P = 2^256 + 297 (prime).

The secret is read as a big-endian integer s < 2^256 < P. ``split`` draws a polynomial
``f(x) = s + a_1 x + ... + a_{t-1} x^{t-1}`` with uniform coefficients and gives holder x
(1 <= x < 2^16) the share ``f(x) mod P``. A share on the wire is 35 bytes: x as big-endian u16,
then ``f(x)`` as 33 big-endian bytes. Any t shares give ``s = f(0)`` by Lagrange interpolation;
fewer reveal nothing about it.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence

from fedge.errors import ProtocolError

__all__ = ["PRIME", "SHARE_BYTES", "combine", "decode_share", "encode_share", "split"]

PRIME = 2**256 + 297
SHARE_BYTES = 35


def split(secret: bytes, xs: Sequence[int], threshold: int) -> dict[int, int]:
    """Shares of ``secret`` (32 bytes) for holders ``xs``, any ``threshold`` of which recover it."""
    if len(secret) != 32:
        raise ValueError("a shared secret is 32 bytes")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be in [1, {len(xs)}]")
    if len(set(xs)) != len(xs) or not all(1 <= x < 2**16 for x in xs):
        raise ValueError("share points must be distinct and in [1, 65535]")
    coeffs = [int.from_bytes(secret, "big")]
    coeffs += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out = {}
    for x in xs:
        y = 0
        for a in reversed(coeffs):  # Horner
            y = (y * x + a) % PRIME
        out[x] = y
    return out


def combine(shares: Iterable[tuple[int, int]], threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares ``(x, y)`` (the first ``threshold`` of
    them, by x, are used)."""
    pts = sorted(dict(shares).items())[:threshold]
    if len(pts) < threshold:
        raise ProtocolError("secagg", f"{len(pts)} shares, {threshold} needed")
    s = 0
    for i, (xi, yi) in enumerate(pts):
        num, den = 1, 1
        for j, (xj, _) in enumerate(pts):
            if i != j:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        s = (s + yi * num * pow(den, -1, PRIME)) % PRIME
    if s >> 256:
        raise ProtocolError("secagg", "shares do not interpolate to a 32-byte secret")
    return s.to_bytes(32, "big")


def encode_share(x: int, y: int) -> bytes:
    return x.to_bytes(2, "big") + y.to_bytes(33, "big")


def decode_share(raw: bytes) -> tuple[int, int]:
    if len(raw) != SHARE_BYTES:
        raise ProtocolError("schema", f"a share is {SHARE_BYTES} bytes, got {len(raw)}")
    x, y = int.from_bytes(raw[:2], "big"), int.from_bytes(raw[2:], "big")
    if x == 0 or y >= PRIME:
        raise ProtocolError("schema", "share out of range")
    return x, y
