"""Ed25519 identities and the exact bytes fedge signs.

A device signs each update with its own key and the aggregator signs each model version with
its key; ``cryptography`` does the Ed25519 work (no hand-written crypto here). What is signed is
a fixed, domain-separated byte layout, not a msgpack map, so a device written in another
language can build it without a canonical msgpack encoder. Both layouts are in
``docs/security.md``; the bytes are built in ``fedge.digests`` (its names are re-exported
here). Ed25519 signs these bytes directly (it hashes internally); a signature is 64 bytes.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedge.digests import (
    MODEL_TAG,
    TASK_TAG,
    UPDATE_TAG,
    calib_block,
    model_digest,
    task_digest,
    update_digest,
)
from fedge.errors import ConfigError, InvalidValue

__all__ = [
    "KEY_BYTES",
    "MODEL_TAG",
    "SIGNATURE_BYTES",
    "TASK_TAG",
    "UPDATE_TAG",
    "SigningKey",
    "VerifyKey",
    "calib_block",
    "load_signing_key",
    "load_verify_key",
    "model_digest",
    "save_signing_key",
    "save_verify_key",
    "task_digest",
    "update_digest",
]

KEY_BYTES = 32
SIGNATURE_BYTES = 64


@dataclass(frozen=True, eq=False)
class VerifyKey:
    """An Ed25519 public key. ``verify`` answers True or False, it never raises on bad input."""

    _key: Ed25519PublicKey

    @classmethod
    def from_bytes(cls, raw: bytes) -> VerifyKey:
        if not isinstance(raw, bytes) or len(raw) != KEY_BYTES:
            raise InvalidValue(f"an Ed25519 public key is {KEY_BYTES} raw bytes")
        return cls(Ed25519PublicKey.from_public_bytes(raw))

    def to_bytes(self) -> bytes:
        return self._key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def to_pem(self) -> bytes:
        return self._key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def fingerprint(self) -> str:
        """First 16 hex digits of sha256(raw key): for logs and file names, not for trust."""
        return hashlib.sha256(self.to_bytes()).hexdigest()[:16]

    def verify(self, message: bytes, signature: bytes) -> bool:
        if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
            return False
        try:
            self._key.verify(signature, message)
        except InvalidSignature:
            return False
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerifyKey) and self.to_bytes() == other.to_bytes()

    def __hash__(self) -> int:
        return hash(self.to_bytes())


@dataclass(frozen=True, eq=False, repr=False)
class SigningKey:
    """An Ed25519 private key."""

    _key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_bytes(cls, raw: bytes) -> SigningKey:
        if not isinstance(raw, bytes) or len(raw) != KEY_BYTES:
            raise InvalidValue(f"an Ed25519 private key is a {KEY_BYTES}-byte seed")
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    def to_bytes(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def to_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def verify_key(self) -> VerifyKey:
        return VerifyKey(self._key.public_key())

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def __repr__(self) -> str:  # never print key material
        return f"SigningKey(public={self.verify_key.fingerprint})"


# -- files ----------------------------------------------------------------------------------


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start (no window where it is world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed it further; make it exact
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_signing_key(path: Path, key: SigningKey, *, raw: bool = False) -> None:
    """Write the private key, mode 0600: PKCS#8 PEM, or the raw 32-byte seed if ``raw``."""
    _write_new(Path(path), key.to_bytes() if raw else key.to_pem(), 0o600)


def save_verify_key(path: Path, key: VerifyKey, *, raw: bool = False) -> None:
    """Write the public key, mode 0644: SubjectPublicKeyInfo PEM, or the raw 32 bytes."""
    _write_new(Path(path), key.to_bytes() if raw else key.to_pem(), 0o644)


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror or e}") from None


def load_signing_key(path: Path) -> SigningKey:
    """Read a private key written by ``save_signing_key`` (PEM or raw 32 bytes).

    Refused when group or others may read it, as ssh does: a leaked key lets anyone sign as
    this device or as the aggregator.
    """
    path = Path(path)
    data = _read(path, "signing key")
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"signing key {path} is accessible by other users (mode {stat.S_IMODE(mode):o}); "
            f"run: chmod 600 {path}"
        )
    if len(data) == KEY_BYTES:
        return SigningKey.from_bytes(data)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise ConfigError(f"{path} is not an unencrypted PEM private key: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return SigningKey(key)


def load_verify_key(path: Path) -> VerifyKey:
    """Read a public key written by ``save_verify_key`` (PEM or raw 32 bytes)."""
    path = Path(path)
    data = _read(path, "public key")
    if len(data) == KEY_BYTES:
        return VerifyKey.from_bytes(data)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ConfigError(f"{path} is not a PEM public key: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return VerifyKey(key)
