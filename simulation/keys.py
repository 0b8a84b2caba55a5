"""Signing identities for a simulated fleet: one Ed25519 key per device and one for the
aggregator, laid out as the key registry `fedge enroll` writes (fedge.key_registry); the
aggregator's private key sits beside it as ``aggregator.key``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedge.identity import SigningKey, VerifyKey, save_signing_key
from fedge.key_registry import KeyRegistry

__all__ = ["SimKeys"]


@dataclass(frozen=True)
class SimKeys:
    registry: Path
    aggregator_key: Path
    aggregator_key_pub: VerifyKey
    device_keys: tuple[SigningKey, ...]

    @classmethod
    def make(cls, directory: Path, devices: int) -> SimKeys:
        registry = KeyRegistry(directory).create()
        keys = tuple(SigningKey.generate() for _ in range(devices))
        for i, k in enumerate(keys):
            registry.add(f"dev-{i:04d}", k.verify_key)
        agg = SigningKey.generate()
        save_signing_key(directory / "aggregator.key", agg)
        return cls(directory, directory / "aggregator.key", agg.verify_key, keys)
