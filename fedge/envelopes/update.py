"""``ModelUpdate``: one device's compressed, signed delta for one round (protocol §5.3)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Self

from fedge.envelopes.common import (
    _MAX_ROUND,
    SCHEMA_VERSION,
    SIGNATURE_BYTES,
    Kind,
    _codec,
    _device,
    _nonce,
    _open,
)
from fedge.limits import DEFAULT_LIMITS, Limits
from fedge.wire import pack


@dataclass(frozen=True)
class ModelUpdate:
    """A device's delta for one round, encoded by the round's codec."""

    device: str
    round: int
    base_version: int
    update_id: str
    nonce: bytes
    num_samples: int
    codec: str
    delta: bytes
    metrics: dict[str, float] = field(default_factory=dict)
    signature: bytes = b""  # Ed25519 over digest(); empty when the fleet does not sign
    # Activation ranges of the device's data through the base model: tensor -> (min, max).
    calib: dict[str, tuple[float, float]] = field(default_factory=dict)

    def digest(self) -> bytes:
        """What the device signs: fedge.identity.update_digest over this update's fields."""
        import hashlib

        from fedge.identity import update_digest

        return update_digest(
            self.device,
            self.round,
            self.nonce,
            hashlib.sha256(self.delta).digest(),
            base_version=self.base_version,
            num_samples=self.num_samples,
            codec=self.codec,
            calib=self.calib,
        )

    def to_bytes(self) -> bytes:
        # ``calib`` only when there are ranges (optional, absent = {}; signed as the same block)
        calib = {k: [float(lo), float(hi)] for k, (lo, hi) in self.calib.items()}
        return pack(
            {
                "v": SCHEMA_VERSION,
                "kind": str(Kind.UPDATE),
                "device": self.device,
                "round": self.round,
                "base_version": self.base_version,
                "update_id": self.update_id,
                "nonce": self.nonce,
                "num_samples": self.num_samples,
                "codec": self.codec,
                "delta": self.delta,
                "metrics": dict(self.metrics),
                "signature": self.signature,
                **({"calib": calib} if calib else {}),
            }
        )

    @classmethod
    def from_bytes(cls, payload: bytes, limits: Limits = DEFAULT_LIMITS) -> Self:
        f = _open(payload, Kind.UPDATE, limits)
        upd = cls(
            device=_device(f),
            round=f.int("round", 1, _MAX_ROUND),
            base_version=f.int("base_version", 0, _MAX_ROUND),
            update_id=f.str("update_id"),
            nonce=_nonce(f),
            # Not clamped here: the aggregator clamps to its own bound and counts the event.
            num_samples=f.int("num_samples", 1, 2**62),
            codec=_codec(f),
            delta=f.bytes("delta", max_len=limits.max_payload_bytes),
            metrics=f.number_map("metrics"),
            signature=f.bytes("signature", max_len=SIGNATURE_BYTES, optional=True) or b"",
            calib=f.range_map("calib"),
        )
        f.done()
        return upd
