"""Per-round X25519 keys, key agreement through HKDF, and the AEAD that seals shares.

Each device makes two X25519 key pairs per round: ``c`` (to encrypt shares) and ``s`` (for
pairwise masks). Two are needed: a dropped device's ``s`` private key is reconstructed by
the aggregator, which must not then be able to open the shares that device exchanged.

- pairwise mask seed of i and j: ``HKDF(X25519(s_i, S_j), salt=round nonce,
  info="fedge secagg pair v1")``;
- share key of i and j: ``HKDF(X25519(c_i, C_j), salt=round nonce, info="fedge secagg share
  v1")``, used with ChaCha20-Poly1305 (RFC 8439), nonce 11 zero bytes then 0x01 when the
  sender's id sorts before the recipient's (UTF-8 bytes) and 0x02 otherwise (each direction
  seals exactly one message per round), associated data ``"fedge secagg share v1" || u32
  round || u8 len || sender || u8 len || recipient``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from fedge.errors import ProtocolError
from fedge.secagg.prg import hkdf

__all__ = ["PAIR_INFO", "SHARE_INFO", "KeyPair", "agree", "open_share", "seal_share"]

PAIR_INFO = b"fedge secagg pair v1"
SHARE_INFO = b"fedge secagg share v1"


@dataclass(frozen=True, repr=False)
class KeyPair:
    private: bytes  # 32 raw bytes
    public: bytes  # 32 raw bytes

    @classmethod
    def generate(cls) -> KeyPair:
        k = X25519PrivateKey.generate()
        return cls(_raw_private(k), k.public_key().public_bytes_raw())

    @classmethod
    def from_private(cls, raw: bytes) -> KeyPair:
        k = X25519PrivateKey.from_private_bytes(raw)
        return cls(raw, k.public_key().public_bytes_raw())

    def __repr__(self) -> str:  # never print key material
        return f"KeyPair(public={self.public.hex()[:16]}...)"


def _raw_private(k: X25519PrivateKey) -> bytes:
    return k.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def agree(private: bytes, peer_public: bytes, salt: bytes, info: bytes) -> bytes:
    """A 32-byte key both ends derive; ``ProtocolError`` for a bad or low-order peer key."""
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(peer_public)
        )
    except ValueError as e:
        raise ProtocolError("secagg", f"key agreement failed: {e}") from None
    return hkdf(shared, info, salt=salt)


def _ad(round_id: int, sender: str, recipient: str) -> bytes:
    s, r = sender.encode(), recipient.encode()
    return SHARE_INFO + struct.pack(">I", round_id) + bytes([len(s)]) + s + bytes([len(r)]) + r


def _nonce(sender: str, recipient: str) -> bytes:
    return bytes(11) + (b"\x01" if sender.encode() < recipient.encode() else b"\x02")


def seal_share(key: bytes, round_id: int, sender: str, recipient: str, plain: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(
        _nonce(sender, recipient), plain, _ad(round_id, sender, recipient)
    )


def open_share(key: bytes, round_id: int, sender: str, recipient: str, sealed: bytes) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(
            _nonce(sender, recipient), sealed, _ad(round_id, sender, recipient)
        )
    except InvalidTag:
        raise ProtocolError("secagg", f"share from {sender} does not authenticate") from None
