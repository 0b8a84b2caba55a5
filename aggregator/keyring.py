"""The device public keys the aggregator trusts, read from the registry ``fedge enroll`` writes.

The layout (``devices/<device>.pub``, ``revoked/<device>-<fp>.pub``) belongs to
``fedge.key_registry``; this module holds the aggregator's policy over it.

A key is trusted when it is under ``devices/`` and its bytes appear nowhere under ``revoked/``
(so copying a revoked key back does not revive it). The registry is re-read when either
directory changes (its mtime) and at least every ``max_age`` seconds, so a revocation takes
effect without restarting the aggregator. A file that cannot be read or parsed is skipped and
logged: one bad file never locks out the rest of the fleet.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from fedge.errors import ConfigError, InvalidUpdate
from fedge.identity import VerifyKey, load_verify_key
from fedge.key_registry import KeyFile, KeyRegistry
from fedge.topics import validate_device_id

__all__ = ["KeyRing"]

log = logging.getLogger(__name__)


class KeyRing:
    def __init__(self, registry: Path, *, max_age: float = 10.0) -> None:
        self.registry = Path(registry)
        self._store = KeyRegistry(self.registry).require()
        self.max_age = max_age
        self._keys: dict[str, VerifyKey] = {}
        self._revoked_devices: set[str] = set()
        self._stamp: tuple[int, ...] = ()
        self._loaded_at = 0.0
        self.reload()

    # -- loading -------------------------------------------------------------------------------
    @staticmethod
    def _load(files: list[KeyFile]) -> dict[KeyFile, VerifyKey]:
        found: dict[KeyFile, VerifyKey] = {}
        for entry in files:
            try:
                found[entry] = load_verify_key(entry.path)
            except (ConfigError, ValueError) as e:
                log.warning("key registry: skipped %s: %s", entry.path, e)
        return found

    def reload(self) -> None:
        """Read the registry now."""
        stamp = self._store.change_stamp()
        revoked = self._load(self._store.revoked())
        revoked_bytes = {k.to_bytes() for k in revoked.values()}
        keys: dict[str, VerifyKey] = {}
        for entry, key in self._load(self._store.enrolled()).items():
            try:
                device = validate_device_id(entry.device)
            except ValueError:
                log.warning("key registry: %s is not named after a valid device id", entry.path)
                continue
            if key.to_bytes() in revoked_bytes:
                log.warning("key registry: %s holds a revoked key; refused", entry.path)
                continue
            keys[device] = key
        self._keys = keys
        self._revoked_devices = {entry.device for entry in revoked} - set(keys)
        self._stamp = stamp
        self._loaded_at = time.monotonic()

    def _fresh(self) -> None:
        if (
            self._store.change_stamp() != self._stamp
            or time.monotonic() - self._loaded_at > self.max_age
        ):
            self.reload()

    # -- queries -------------------------------------------------------------------------------
    @property
    def devices(self) -> frozenset[str]:
        self._fresh()
        return frozenset(self._keys)

    def public_key(self, device: str) -> VerifyKey | None:
        self._fresh()
        return self._keys.get(device)

    @property
    def revoked_devices(self) -> frozenset[str]:
        """Devices that had a key revoked and hold no valid one now."""
        self._fresh()
        return frozenset(self._revoked_devices)

    def is_revoked(self, device: str) -> bool:
        """True if ``device`` had a key revoked and holds no valid one now."""
        self._fresh()
        return device in self._revoked_devices

    def check_update(self, device: str, digest: bytes, signature: bytes) -> None:
        """Raise ``InvalidUpdate`` with reason ``revoked_device``, ``unknown_device`` or
        ``bad_signature`` unless ``signature`` is ``device``'s signature of ``digest``."""
        key = self.public_key(device)
        if key is None:
            if device in self._revoked_devices:
                raise InvalidUpdate("revoked_device", f"{device}: its key was revoked")
            raise InvalidUpdate("unknown_device", f"{device}: no enrolled key")
        if not key.verify(digest, signature):
            raise InvalidUpdate("bad_signature", f"{device}: signature does not verify")

    def verify_update(self, device: str, digest: bytes, signature: bytes) -> bool:
        """True only for a known, unrevoked device whose key signed ``digest``."""
        try:
            self.check_update(device, digest, signature)
        except InvalidUpdate:
            return False
        return True
