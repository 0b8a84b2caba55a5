"""Masks: a 32-byte seed expanded into ring elements by ChaCha20 (counter mode).

``key = HKDF-SHA256(ikm=seed, salt=empty, info="fedge secagg prg v1", length=32)``; the
keystream of ChaCha20 (RFC 7539 block function, 16-byte initial block = 32-bit counter 0 and
a 96-bit zero nonce, which is what ``cryptography``'s ``ChaCha20`` takes) encrypting zeros,
read as little-endian uint32 words; element k is word k modulo ``2^B`` (its low B bits, so a
uniform word gives a uniform element). Every seed is used for one round and one purpose.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["PRG_INFO", "expand", "hkdf"]

PRG_INFO = b"fedge secagg prg v1"
_ZERO_NONCE = bytes(16)


def hkdf(ikm: bytes, info: bytes, salt: bytes | None = None, length: int = 32) -> bytes:
    """HKDF-SHA256 (RFC 5869)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def expand(seed: bytes, count: int, bits: int) -> np.ndarray:
    """``count`` ring elements (uint64, each < 2^bits) from ``seed``."""
    if len(seed) != 32:
        raise ValueError("a mask seed is 32 bytes")
    key = hkdf(seed, PRG_INFO)
    enc = Cipher(algorithms.ChaCha20(key, _ZERO_NONCE), mode=None).encryptor()
    words = np.frombuffer(enc.update(bytes(4 * count)), "<u4").astype(np.uint64)
    return words & np.uint64((1 << bits) - 1)
