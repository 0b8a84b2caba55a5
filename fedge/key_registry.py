"""The on-disk key registry: which devices are enrolled, and which keys were retired.

    REGISTRY/devices/<device>.pub          one Ed25519 public key per enrolled device
    REGISTRY/revoked/<device>-<fp>.pub     keys retired by ``fedge revoke`` (fp: key fingerprint)

``fedge ca init`` makes it (``CA/keys``), ``fedge enroll`` / ``fedge revoke`` fill it
(``fedge_cli.pki.enrolment``), the simulator lays out the same tree (``simulation.keys``) and
the aggregator reads it (``aggregator.keyring``). This module is the only one that knows the
layout; policy (what is trusted, how often to re-read) stays with the readers.

Keys are written by ``fedge.identity.save_verify_key``: mode 0644, created under a temporary
name and renamed into place, so a reader never sees half a key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fedge.errors import ConfigError
from fedge.identity import VerifyKey, load_verify_key, save_verify_key
from fedge.topics import validate_device_id

__all__ = ["DEVICES", "KEY_SUFFIX", "REVOKED", "KeyFile", "KeyRegistry"]

DEVICES = "devices"
REVOKED = "revoked"
KEY_SUFFIX = ".pub"


@dataclass(frozen=True)
class KeyFile:
    """One key file in the registry and the device its name stands for (not validated)."""

    device: str
    path: Path


@dataclass(frozen=True)
class KeyRegistry:
    """The layout of a key registry rooted at ``root`` (module docstring)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # -- paths ---------------------------------------------------------------------------------
    @property
    def devices_dir(self) -> Path:
        return self.root / DEVICES

    @property
    def revoked_dir(self) -> Path:
        return self.root / REVOKED

    def device_key_path(self, device: str) -> Path:
        """Where ``device``'s enrolled public key lives."""
        return self.devices_dir / f"{validate_device_id(device)}{KEY_SUFFIX}"

    def revoked_key_path(self, device: str, fingerprint: str) -> Path:
        """Where a retired key of ``device`` with ``fingerprint`` is kept."""
        return self.revoked_dir / f"{validate_device_id(device)}-{fingerprint}{KEY_SUFFIX}"

    # -- making and checking -------------------------------------------------------------------
    def create(self) -> KeyRegistry:
        """Make the (empty) ``devices/`` and ``revoked/`` directories; existing ones are kept."""
        self.devices_dir.mkdir(parents=True, exist_ok=True)
        self.revoked_dir.mkdir(parents=True, exist_ok=True)
        return self

    def require(self) -> KeyRegistry:
        """``self``, or ``ConfigError`` if ``root`` holds no ``devices/`` directory."""
        if not self.devices_dir.is_dir():
            raise ConfigError(
                f"{self.root} is not a key registry (no {DEVICES}/ in it); it is made by "
                f"`fedge ca init` (CA/keys) and filled by `fedge enroll`"
            )
        return self

    def change_stamp(self) -> tuple[int, ...]:
        """(mtime, inode) of both directories: changes whenever a key is added, moved or removed."""
        stamp: list[int] = []
        for folder in (self.devices_dir, self.revoked_dir):
            try:
                st = folder.stat()
            except OSError:
                stamp += [0, 0]
            else:
                stamp += [st.st_mtime_ns, st.st_ino]
        return tuple(stamp)

    # -- one device ----------------------------------------------------------------------------
    def is_enrolled(self, device: str) -> bool:
        return self.device_key_path(device).exists()

    def add(self, device: str, key: VerifyKey) -> Path:
        """Register ``key`` as ``device``'s (replacing any there); returns the file written."""
        path = self.device_key_path(device)
        save_verify_key(path, key)
        return path

    def read_key(self, device: str) -> VerifyKey:
        """``device``'s enrolled key; ``ConfigError`` if it is missing or unreadable."""
        return load_verify_key(self.device_key_path(device))

    def retire(self, device: str) -> Path | None:
        """Move ``device``'s enrolled key to ``revoked/``; the new path, or None if none was."""
        registered = self.device_key_path(device)
        if not registered.exists():
            return None
        retired = self.revoked_key_path(device, self.read_key(device).fingerprint)
        retired.parent.mkdir(parents=True, exist_ok=True)
        os.replace(registered, retired)
        return retired

    # -- listing -------------------------------------------------------------------------------
    def enrolled(self) -> list[KeyFile]:
        """Every ``devices/*.pub``, sorted by path; the device is the file's stem."""
        return [KeyFile(p.stem, p) for p in _key_files(self.devices_dir)]

    def revoked(self) -> list[KeyFile]:
        """Every ``revoked/*.pub``, sorted by path; the device is the stem up to its last ``-``."""
        return [KeyFile(p.stem.rsplit("-", 1)[0], p) for p in _key_files(self.revoked_dir)]


def _key_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(folder.glob(f"*{KEY_SUFFIX}"))
