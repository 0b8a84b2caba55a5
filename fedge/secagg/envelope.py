"""The envelope of every secure-round message and what reading one takes.

``{"v": 1, "kind": "secagg", "body": bin, "sig": bin}``: ``body`` is a msgpack map whose
``type`` names the message (``fedge.secagg.messages``), ``sig`` Ed25519 over ``SIGN_TAG ||
body`` by the sender (empty when the fleet does not sign). Signing the body bytes as sent
keeps the signed bytes independent of any re-encoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Self, TypeVar

from fedge.errors import InvalidValue, ProtocolError
from fedge.identity import SigningKey, VerifyKey
from fedge.limits import Limits
from fedge.topics import validate_device_id
from fedge.wire import Fields, open_envelope, pack, unpack_map

__all__ = ["SECAGG_VERSION", "SIGN_TAG", "Body", "Signed", "read_body"]

SECAGG_VERSION = 1
SIGN_TAG = b"fedge secagg v1\x00"


@dataclass(frozen=True)
class Signed:
    """One message as sent: its body bytes and the signature over them."""

    body: bytes
    sig: bytes = b""

    @classmethod
    def make(cls, body: Body, key: SigningKey | None) -> Signed:
        raw = pack(body.to_map())
        return cls(raw, key.sign(SIGN_TAG + raw) if key is not None else b"")

    def to_bytes(self) -> bytes:
        return pack({"v": SECAGG_VERSION, "kind": "secagg", "body": self.body, "sig": self.sig})

    @classmethod
    def from_bytes(cls, payload: bytes, limits: Limits) -> Signed:
        f = open_envelope(payload, "secagg", SECAGG_VERSION, limits)
        out = cls(f.bytes("body", max_len=limits.max_payload_bytes), f.bytes("sig", max_len=64))
        f.done()
        return out

    def verified_by(self, key: VerifyKey) -> bool:
        return key.verify(SIGN_TAG + self.body, self.sig)


B = TypeVar("B", bound="Body")


def read_body(signed: Signed, cls: type[B], limits: Limits) -> B:
    """The typed body of ``signed``; ``ProtocolError`` if it is not a valid ``cls``."""
    f = Fields(unpack_map(signed.body, limits, what="secagg body"), "secagg body", limits)
    got = f.str("type")
    if got != cls.TYPE:
        raise ProtocolError("schema", f"expected a secagg {cls.TYPE}, got {got!r}")
    try:
        body = cls.read(f, limits)
    except InvalidValue as e:
        raise ProtocolError("schema", str(e)) from None
    f.done()
    return body


class Body:
    TYPE: ClassVar[str]

    def to_map(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def read(cls, f: Fields, limits: Limits) -> Self:
        raise NotImplementedError


def _dev(v: Any) -> str:
    if not isinstance(v, str):
        raise InvalidValue("device id must be a string")
    return validate_device_id(v)


def _pairs(v: Any, size: int | None, limit: int) -> tuple[tuple[str, bytes], ...]:
    """A list of ``[device, bytes]``; each bytes exactly ``size`` long when given."""
    if not isinstance(v, list) or len(v) > limit:
        raise InvalidValue("expected a bounded list of [device, bytes] pairs")
    out = []
    for item in v:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[1], bytes)):
            raise InvalidValue("expected [device, bytes] pairs")
        if size is not None and len(item[1]) != size:
            raise InvalidValue(f"expected {size} bytes, got {len(item[1])}")
        out.append((_dev(item[0]), item[1]))
    if len({d for d, _ in out}) != len(out):
        raise InvalidValue("a device appears twice")
    return tuple(out)


def _devices(v: Any, limit: int) -> tuple[str, ...]:
    if not isinstance(v, list) or len(v) > limit:
        raise InvalidValue("expected a bounded list of device ids")
    out = tuple(_dev(d) for d in v)
    if len(set(out)) != len(out):
        raise InvalidValue("a device appears twice")
    return out
