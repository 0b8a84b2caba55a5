"""The signed messages of a secure round (docs/protocol.md §16).

Every message is the msgpack map ``{"v": 1, "kind": "secagg", "body": bin, "sig": bin}``;
``body`` is itself a msgpack map whose ``type`` names the stage, and ``sig`` is Ed25519 over
``"fedge secagg v1" || 0x00 || body`` by the sender (a device's identity key, or the
aggregator's key; empty when the fleet does not sign). Signing the body bytes as sent keeps
the signed bytes independent of any re-encoding.

aggregator -> devices (``{p}/secagg/stage``, retained; ``{p}/inbox/{device}``):
``Open``, ``Roster``, ``Inbox``, ``Unmask``. devices -> aggregator
(``{p}/secagg/{stage}/{device}``): ``Advertise``, ``ShareBundle``, ``MaskedInput``,
``UnmaskReply``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Self

from fedge.errors import InvalidValue
from fedge.limits import Limits
from fedge.secagg.envelope import SIGN_TAG, Body, Signed, _dev, _devices, _pairs, read_body
from fedge.secagg.ring import RingSpec
from fedge.secagg.shamir import SHARE_BYTES
from fedge.wire import Fields

__all__ = [
    "SIGN_TAG",
    "Advertise",
    "Body",
    "Inbox",
    "MaskedInput",
    "Open",
    "Roster",
    "ShareBundle",
    "Signed",
    "Unmask",
    "UnmaskReply",
    "read_body",
]

_MAX_ROUND = 2**31
_KEY = 32
_SEALED = 2 * SHARE_BYTES + 16  # sealed share: two shares + the Poly1305 tag


@dataclass(frozen=True)
class Open(Body):
    """A secure round starts: the ring every device quantizes into."""

    TYPE: ClassVar[str] = "open"
    round: int
    nonce: bytes  # the round task's nonce: salt of every key derivation, seed of the graph
    ring: RingSpec
    # > 0 (central DP on the sum): each device clips its delta to this L2 norm and weighs 1.
    l2_clip: float = 0.0

    def to_map(self) -> dict[str, Any]:
        r = self.ring
        return {
            "type": self.TYPE,
            "round": self.round,
            "nonce": self.nonce,
            "value_bits": r.value_bits,
            "headroom_bits": r.headroom_bits,
            "clip": float(r.clip),
            "weight_cap": r.weight_cap,
            "l2_clip": float(self.l2_clip),
        }

    @classmethod
    def read(cls, f: Fields, limits: Limits) -> Self:
        nonce = f.bytes("nonce", max_len=16)
        if len(nonce) != 16:
            raise InvalidValue("nonce must be 16 bytes")
        return cls(
            f.int("round", 1, _MAX_ROUND),
            nonce,
            RingSpec(
                f.int("value_bits", 2, 24),
                f.int("headroom_bits", 0, 30),
                f.float("clip", 0.0),
                f.int("weight_cap", 1, 2**31),
            ),
            f.float("l2_clip", 0.0),
        )


@dataclass(frozen=True)
class Advertise(Body):
    TYPE: ClassVar[str] = "advertise"
    round: int
    device: str
    c_pk: bytes  # X25519, seals shares
    s_pk: bytes  # X25519, pairwise masks

    def to_map(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "round": self.round,
            "device": self.device,
            "c_pk": self.c_pk,
            "s_pk": self.s_pk,
        }

    @classmethod
    def read(cls, f: Fields, limits: Limits) -> Self:
        out = cls(
            f.int("round", 1, _MAX_ROUND),
            _dev(f.str("device")),
            f.bytes("c_pk", max_len=_KEY),
            f.bytes("s_pk", max_len=_KEY),
        )
        if len(out.c_pk) != _KEY or len(out.s_pk) != _KEY or out.c_pk == out.s_pk:
            raise InvalidValue("public keys must be two distinct 32-byte X25519 keys")
        return out


@dataclass(frozen=True)
class Roster(Body):
    """Everyone who advertised in time, their signed adverts as sent, the graph's degree and
    the shares threshold."""

    TYPE: ClassVar[str] = "roster"
    round: int
    degree: int
    threshold: int
    adverts: tuple[Signed, ...]

    def to_map(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "round": self.round,
            "degree": self.degree,
            "threshold": self.threshold,
            "adverts": [[a.body, a.sig] for a in self.adverts],
        }

    @classmethod
    def read(cls, f: Fields, limits: Limits) -> Self:
        raw = f.raw("adverts")
        if not isinstance(raw, list) or len(raw) > limits.max_array_len:
            raise InvalidValue("adverts must be a bounded list")
        adverts = []
        for a in raw:
            if not (isinstance(a, list) and len(a) == 2 and all(isinstance(x, bytes) for x in a)):
                raise InvalidValue("an advert is [body, sig]")
            adverts.append(Signed(a[0], a[1]))
        return cls(
            f.int("round", 1, _MAX_ROUND),
            f.int("degree", 1, 2**16),
            f.int("threshold", 1, 2**16),
            tuple(adverts),
        )


@dataclass(frozen=True)
class ShareBundle(Body):
    """A device's sealed shares, one per neighbour: ``(recipient, sealed)``."""

    TYPE: ClassVar[str] = "shares"
    round: int
    device: str
    sealed: tuple[tuple[str, bytes], ...]

    def to_map(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "round": self.round,
            "device": self.device,
            "sealed": [list(p) for p in self.sealed],
        }

    @classmethod
    def read(cls, f: Fields, limits: Limits) -> Self:
        return cls(
            f.int("round", 1, _MAX_ROUND),
            _dev(f.str("device")),
            _pairs(f.raw("sealed"), _SEALED, limits.max_array_len),
        )


@dataclass(frozen=True)
class Inbox(ShareBundle):
    """The shares sealed to ``device`` by its neighbours that shared: ``(sender, sealed)``.
    Who is in it is who ``device`` masks with."""

    TYPE: ClassVar[str] = "inbox"


@dataclass(frozen=True)
class MaskedInput(Body):
    TYPE: ClassVar[str] = "masked"
    round: int
    device: str
    count: int  # ring elements: parameters + 1
    data: bytes  # packed, ceil(count * B / 8) bytes

    def to_map(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "round": self.round,
            "device": self.device,
            "count": self.count,
            "data": self.data,
        }

    @classmethod
    def read(cls, f: Fields, limits: Limits) -> Self:
        return cls(
            f.int("round", 1, _MAX_ROUND),
            _dev(f.str("device")),
            f.int("count", 1, limits.max_tensor_elements),
            f.bytes("data", max_len=limits.max_payload_bytes),
        )


@dataclass(frozen=True)
class Unmask(Body):
    """Who sent a masked input in time (``survivors``) and who shared but did not
    (``dropped``)."""

    TYPE: ClassVar[str] = "unmask"
    round: int
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]

    def to_map(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "round": self.round,
            "survivors": list(self.survivors),
            "dropped": list(self.dropped),
        }

    @classmethod
    def read(cls, f: Fields, limits: Limits) -> Self:
        out = cls(
            f.int("round", 1, _MAX_ROUND),
            _devices(f.raw("survivors"), limits.max_array_len),
            _devices(f.raw("dropped"), limits.max_array_len),
        )
        if set(out.survivors) & set(out.dropped):
            raise InvalidValue("a device cannot be both a survivor and dropped")
        return out


@dataclass(frozen=True)
class UnmaskReply(Body):
    """Shares a survivor holds: of the self-mask seeds of survivors (``seeds``) and of the
    mask keys of dropped devices (``keys``), each ``(owner, 35-byte share)``."""

    TYPE: ClassVar[str] = "reply"
    round: int
    device: str
    seeds: tuple[tuple[str, bytes], ...]
    keys: tuple[tuple[str, bytes], ...]

    def to_map(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "round": self.round,
            "device": self.device,
            "seeds": [list(p) for p in self.seeds],
            "keys": [list(p) for p in self.keys],
        }

    @classmethod
    def read(cls, f: Fields, limits: Limits) -> Self:
        n = limits.max_array_len
        out = cls(
            f.int("round", 1, _MAX_ROUND),
            _dev(f.str("device")),
            _pairs(f.raw("seeds"), SHARE_BYTES, n),
            _pairs(f.raw("keys"), SHARE_BYTES, n),
        )
        if {d for d, _ in out.seeds} & {d for d, _ in out.keys}:
            raise InvalidValue("never both shares of one device")
        return out
