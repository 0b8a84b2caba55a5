"""What every envelope shares: the schema version, the kinds, field readers for device ids and
nonces, and the sizes of nonces and signatures."""

from __future__ import annotations

from enum import StrEnum

from fedge.errors import InvalidValue, ProtocolError
from fedge.limits import Limits
from fedge.topics import validate_device_id
from fedge.wire import Fields, open_envelope

SCHEMA_VERSION = 1


NONCE_BYTES = 16


SIGNATURE_BYTES = 64


_MAX_ROUND = 2**31


class Kind(StrEnum):
    TASK = "task"
    UPDATE = "update"
    MODEL = "model"
    CHUNK = "chunk"
    STATUS = "status"
    RECEIPT = "receipt"
    RELEASE = "release"
    PATCH = "patch"


class DeviceState(StrEnum):
    ONLINE = "online"
    TRAINING = "training"
    OFFLINE = "offline"


def _open(payload: bytes, kind: Kind, limits: Limits) -> Fields:
    return open_envelope(payload, str(kind), SCHEMA_VERSION, limits)


def _device(f: Fields, key: str = "device") -> str:
    d = f.str(key)
    try:
        return validate_device_id(d)
    except InvalidValue as e:
        raise ProtocolError("schema", str(e)) from None


MAX_CODEC_BYTES = 255  # the signed digests carry its length in one byte (fedge.identity)


def _codec(f: Fields) -> str:
    """The ``codec`` field: 1-255 ASCII characters, so that it fits the signed digests."""
    c: str = f.str("codec")
    if not c.isascii() or not 1 <= len(c) <= MAX_CODEC_BYTES:
        raise ProtocolError(
            "schema", f"codec must be 1-{MAX_CODEC_BYTES} ASCII characters, got {len(c)}"
        )
    return c


def _nonce(f: Fields) -> bytes:
    n: bytes = f.bytes("nonce", max_len=NONCE_BYTES)
    if len(n) != NONCE_BYTES:
        raise ProtocolError("schema", f"nonce must be exactly {NONCE_BYTES} bytes, got {len(n)}")
    return n


def _opt_tuple(v: list[str] | None) -> tuple[str, ...] | None:
    return None if v is None else tuple(v)


def _opt(v: int | None, default: int) -> int:
    return default if v is None else v
