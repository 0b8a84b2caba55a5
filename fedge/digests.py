"""The exact bytes fedge signs (``fedge.identity`` holds the keys that sign them).

What is signed is a fixed, domain-separated byte layout, not a msgpack map, so a device written
in another language can build it without a canonical msgpack encoder. Both layouts are in
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
import struct
from collections.abc import Mapping, Sequence

from fedge.topics import validate_device_id

__all__ = [
    "MODEL_TAG",
    "TASK_TAG",
    "UPDATE_TAG",
    "calib_block",
    "model_digest",
    "task_digest",
    "update_digest",
]

UPDATE_TAG = b"fedge.update.v2\x00"
MODEL_TAG = b"fedge.model.v1\x00\x00"
TASK_TAG = b"fedge.task.v1\x00\x00\x00"
_U32 = 2**32
_U64 = 2**64


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
