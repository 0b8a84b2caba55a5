"""Ed25519 identities and the exact bytes fedge signs.

A device signs each update with its own key and the aggregator signs each model version with
its key; ``cryptography`` does the Ed25519 work (no hand-written crypto here). What is signed is
a fixed, domain-separated byte layout, not a msgpack map, so a device written in another
language can build it without a canonical msgpack encoder. Both layouts are in
``docs/security.md``; in short (integers big-endian, strings ASCII):

    update_digest = b"fedge.update.v2\\x00"                    16 bytes
                    u8 len(device) | device                     1 + 1..64
                    u32 round | u32 base_version | u64 num_samples
                    u8 len(codec) | codec                       1 + 1..255
                    u8 len(nonce) | nonce                       1 + 0..255 (16 in v1 tasks)
                    sha256(delta bytes as sent)                 32
                    sha256(calib_block(calib))                  32

    calib_block   = u16 count, then per range in UTF-8 byte order of the names:
                    u16 len(name) | name (UTF-8) | f64 min | f64 max

(``v2``: the calibration ranges joined the signed bytes; a ``v1`` signature never verifies.)

    model_digest  = b"fedge.model.v1\\x00\\x00"                  16 bytes
                    u32 version
                    sha256(ONNX bytes)                          32

    task_digest   = b"fedge.task.v1\\x00\\x00\\x00"                16 bytes
                    u32 round | u32 base_version | f64 deadline | f64 issued
                    u8 len(codec) | codec
                    hyper: u32 epochs | u32 batch_size | f64 lr | f64 momentum
                           f64 weight_decay | f64 prox_mu | u8 qat | u8 calibrate
                           u32 early_stop_patience | f64 val_fraction
                    u8 len(nonce) | nonce
                    u8 has_selected, then u32 count | (u8 len(id) | id)*
                    u32 accepts_from (0: absent)

Ed25519 signs these bytes directly (it hashes internally); a signature is 64 bytes.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedge.errors import ConfigError, InvalidValue
from fedge.topics import validate_device_id

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
UPDATE_TAG = b"fedge.update.v2\x00"
MODEL_TAG = b"fedge.model.v1\x00\x00"
TASK_TAG = b"fedge.task.v1\x00\x00\x00"
_U32 = 2**32
_U64 = 2**64


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


# -- what is signed -------------------------------------------------------------------------


def _sha256_bytes(value: bytes | str, what: str) -> bytes:
    if isinstance(value, str):
        try:
            value = bytes.fromhex(value)
        except ValueError:
            raise ValueError(f"{what} must be 32 bytes or 64 hex digits") from None
    if not isinstance(value, bytes) or len(value) != 32:
        raise ValueError(f"{what} must be 32 bytes or 64 hex digits")
    return value


def _uint(value: int, bound: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < bound:
        raise ValueError(f"{what} must be an integer in [0, {bound})")
    return value


def _short(value: bytes, what: str, minimum: int = 0) -> bytes:
    if not minimum <= len(value) <= 255:
        raise ValueError(f"{what} must be {minimum}-255 bytes long")
    return bytes([len(value)]) + value


def update_digest(
    device: str,
    round: int,
    nonce: bytes,
    payload_sha256: bytes | str,
    *,
    base_version: int,
    num_samples: int,
    codec: str,
    calib: Mapping[str, tuple[float, float]] | None = None,
) -> bytes:
    """The bytes a device signs for one update (layout in the module docstring).

    ``payload_sha256`` is sha256 of the ``delta`` field exactly as sent (after the codec and
    zstd), as 32 bytes or 64 hex digits. ``num_samples`` and ``base_version`` are signed too:
    they weigh and place the update, so a relay that could change them could skew the round;
    so is ``calib`` (the activation ranges that set the int8 model's grid; none = empty).
    """
    dev = validate_device_id(device).encode("ascii")
    if not isinstance(nonce, bytes):
        raise ValueError("nonce must be bytes")
    try:
        codec_b = codec.encode("ascii")
    except (AttributeError, UnicodeEncodeError):
        raise ValueError("codec must be an ASCII string") from None
    return b"".join(
        (
            UPDATE_TAG,
            _short(dev, "device id", 1),
            struct.pack(
                ">IIQ",
                _uint(round, _U32, "round"),
                _uint(base_version, _U32, "base_version"),
                _uint(num_samples, _U64, "num_samples"),
            ),
            _short(codec_b, "codec", 1),
            _short(nonce, "nonce"),
            _sha256_bytes(payload_sha256, "payload_sha256"),
            hashlib.sha256(calib_block(calib or {})).digest(),
        )
    )


def calib_block(calib: Mapping[str, tuple[float, float]]) -> bytes:
    """The calibration ranges as signed: u16 count, then per name (in UTF-8 byte order)
    u16 length, the UTF-8 name, and min and max as big-endian float64."""
    named = sorted((name.encode("utf-8"), r) for name, r in calib.items())
    if len(named) >= 2**16 or any(len(n) >= 2**16 for n, _ in named):
        raise ValueError("calibration ranges must be fewer than 65536, names shorter than 64 KiB")
    parts = [struct.pack(">H", len(named))]
    for name, (low, high) in named:
        parts.append(struct.pack(">H", len(name)) + name + struct.pack(">dd", low, high))
    return b"".join(parts)


def model_digest(version: int, sha256: bytes | str) -> bytes:
    """The bytes the aggregator signs for one model version: tag, u32 version, sha256(ONNX)."""
    return (
        MODEL_TAG
        + struct.pack(">I", _uint(version, _U32, "version"))
        + _sha256_bytes(sha256, "sha256")
    )


def task_digest(
    round: int,
    base_version: int,
    *,
    deadline: float,
    issued: float,
    codec: str,
    hyper: Sequence[int | float | bool],
    nonce: bytes,
    selected: Sequence[str] | None,
    accepts_from: int | None,
    mask: bytes | None = None,
    trainable: bytes | None = None,
) -> bytes:
    """The bytes the aggregator signs for one round task: every field of it.

    ``mask`` is the SHA-256 of a pruning mask's canonical map (``fedge.masks.Mask.digest``);
    ``trainable`` the SHA-256 of the fine-tuned tensor names (``fedge.trainable.
    trainable_digest``). Each is appended only when present, behind its own tag byte (0x01,
    0x02), so a task without them signs exactly the bytes it signed before they existed.

    ``hyper`` is the ten training settings in the order of the layout (module docstring):
    epochs, batch_size, lr, momentum, weight_decay, prox_mu, qat, calibrate,
    early_stop_patience, val_fraction. Floats are IEEE 754 binary64 of the decoded value (a
    float32 on the wire widens exactly), so any msgpack float width gives the same bytes.
    """
    try:
        codec_b = codec.encode("ascii")
    except (AttributeError, UnicodeEncodeError):
        raise ValueError("codec must be an ASCII string") from None
    if not isinstance(nonce, bytes):
        raise ValueError("nonce must be bytes")
    if len(hyper) != 10:
        raise ValueError("hyper must hold the ten settings of the layout")
    epochs, batch, lr, momentum, decay, mu, qat, calibrate, patience, val = hyper
    parts = [
        TASK_TAG,
        struct.pack(
            ">IIdd",
            _uint(round, _U32, "round"),
            _uint(base_version, _U32, "base_version"),
            float(deadline),
            float(issued),
        ),
        _short(codec_b, "codec", 1),
        struct.pack(
            ">IIddddBBId",
            _uint(int(epochs), _U32, "epochs"),
            _uint(int(batch), _U32, "batch_size"),
            float(lr),
            float(momentum),
            float(decay),
            float(mu),
            bool(qat),
            bool(calibrate),
            _uint(int(patience), _U32, "early_stop_patience"),
            float(val),
        ),
        _short(nonce, "nonce"),
    ]
    if selected is None:
        parts.append(b"\x00")
    else:
        parts.append(b"\x01" + struct.pack(">I", _uint(len(selected), _U32, "len(selected)")))
        parts += [_short(validate_device_id(d).encode("ascii"), "device id", 1) for d in selected]
    parts.append(struct.pack(">I", _uint(accepts_from or 0, _U32, "accepts_from")))
    if mask is not None:
        if len(mask) != 32:
            raise ValueError("mask must be the 32-byte SHA-256 of the mask")
        parts.append(b"\x01" + mask)
    if trainable is not None:
        if len(trainable) != 32:
            raise ValueError("trainable must be the 32-byte SHA-256 of the tensor names")
        parts.append(b"\x02" + trainable)
    return b"".join(parts)
