"""``DeviceStatus`` (retained, last will: offline) and ``Receipt`` (the aggregator's word that an
update counts) (protocol §5.6, §5.7)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Self

from fedge.envelopes.common import (
    _MAX_ROUND,
    SCHEMA_VERSION,
    DeviceState,
    Kind,
    _device,
    _open,
)
from fedge.envelopes.release import ShadowReport
from fedge.limits import DEFAULT_LIMITS, Limits
from fedge.wire import Fields, pack


@dataclass(frozen=True)
class DeviceStatus:
    """Retained liveness of a device; its last will publishes the offline form.

    ``version`` is the training model it holds; ``serving`` the version it answers inference
    with and ``shadow`` its last shadow evaluation of a release candidate (protocol §5.8):
    both are sent only when set."""

    device: str
    state: DeviceState
    version: int | None = None
    ts: float = 0.0
    serving: int | None = None
    shadow: ShadowReport | None = None

    def to_bytes(self) -> bytes:
        extra: dict[str, Any] = {}
        if self.serving is not None:
            extra["serving"] = self.serving
        if self.shadow is not None:
            extra["shadow"] = self.shadow.to_map()
        return pack(
            {
                "v": SCHEMA_VERSION,
                "kind": str(Kind.STATUS),
                "device": self.device,
                "state": str(self.state),
                "version": self.version,
                "ts": float(self.ts),
                **extra,
            }
        )

    @classmethod
    def from_bytes(cls, payload: bytes, limits: Limits = DEFAULT_LIMITS) -> Self:
        f = _open(payload, Kind.STATUS, limits)
        st = cls(
            device=_device(f),
            state=DeviceState(f.str("state", choices=tuple(s.value for s in DeviceState))),
            version=f.int("version", 0, _MAX_ROUND, optional=True),
            ts=f.float("ts", 0.0),
            serving=f.int("serving", 0, _MAX_ROUND, optional=True),
            shadow=_shadow(f, limits),
        )
        f.done()
        return st


def _shadow(f: Fields, limits: Limits) -> ShadowReport | None:
    raw = f.map("shadow", optional=True)
    return None if raw is None else ShadowReport.read(raw, limits)


@dataclass(frozen=True)
class Receipt:
    """The aggregator's word that an update is durably recorded: until it arrives the device
    keeps the update in its outbox and resends it after every reconnect (the broker's PUBACK
    alone is not enough: a broker crash can lose a message in flight to the aggregator).

    ``late``: the update was recorded (by a site gateway) but its round closed without it (the
    site was cut off from the centre) or failed at the centre after the gateway's partial
    sealed it: it is in no version. Sent only as ``late: true``.

    ``device`` is not sent: the topic ``{p}/receipt/{device}`` names it (an optional key, read
    when present; absent, the reader's own id, ``from_bytes(device=...)``)."""

    device: str
    round: int
    update_id: str
    late: bool = False

    def to_bytes(self) -> bytes:
        m: dict[str, object] = {
            "v": SCHEMA_VERSION,
            "kind": str(Kind.RECEIPT),
            "round": self.round,
            "update_id": self.update_id,
        }
        if self.late:
            m["late"] = True
        return pack(m)

    @classmethod
    def from_bytes(cls, payload: bytes, limits: Limits = DEFAULT_LIMITS, device: str = "") -> Self:
        """``device``: whose receipt topic it came on (the receipt does not repeat it)."""
        f = _open(payload, Kind.RECEIPT, limits)
        r = cls(
            device=device if f.str("device", optional=True) is None else _device(f),
            round=f.int("round", 1, _MAX_ROUND),
            update_id=f.str("update_id"),
            late=bool(f.bool("late", optional=True)),
        )
        f.done()
        return r
