"""The file layout of a CA directory, and the issued-certificate records kept in it.

The layout is drawn in the package docstring (``fedge_cli.pki``). ``issued/<id>.json`` holds
one record per identity: ``{"identity": id, "certificates": [{"serial", "not_after",
"key_fingerprint", "revoked"}, ...]}``, ``revoked`` an ISO time or null. The CRL is signed from
these records (``fedge_cli.pki.ca.write_crl``).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from fedge.errors import ConfigError
from fedge.support.fsutil import atomic_write

__all__ = [
    "AGGREGATOR",
    "MONITOR",
    "CaDir",
    "all_records",
    "load_record",
    "mark_revoked",
    "record_certificate",
    "revoked_certificates",
    "save_record",
    "write_file",
]

AGGREGATOR = "aggregator"
MONITOR = "monitor"  # the read-only identity of `fedge status`


@dataclass(frozen=True)
class CaDir:
    """The file layout of a CA directory (package docstring)."""

    root: Path

    ca_crt = property(lambda s: s.root / "ca.crt")
    ca_key = property(lambda s: s.root / "private" / "ca.key")
    broker = property(lambda s: s.root / "broker")
    passwd = property(lambda s: s.root / "broker" / "passwd")
    crl = property(lambda s: s.root / "broker" / "crl.pem")
    server_crt = property(lambda s: s.root / "broker" / "server.crt")
    server_key = property(lambda s: s.root / "broker" / "server.key")
    acl = property(lambda s: s.root / "broker" / "acl")
    issued = property(lambda s: s.root / "issued")
    keys = property(lambda s: s.root / "keys")
    aggregator = property(lambda s: s.root / AGGREGATOR)
    monitor = property(lambda s: s.root / MONITOR)
    fleets = property(lambda s: s.root / "fleets")  # fleets added by `fedge ca fleet`
    fleet_record = property(lambda s: s.root / "fleet.json")

    def require(self) -> CaDir:
        if not self.ca_crt.is_file() or not self.ca_key.is_file():
            raise ConfigError(
                f"{self.root} is not a CA directory; make one: fedge ca init --dir DIR"
            )
        return self

    def record_path(self, identity: str) -> Path:
        return self.issued / f"{identity}.json"


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` atomically with ``data`` and ``mode``, keeping the owner and group of
    the file it replaces: an operator who gave the broker's group the password file or the
    server key (``chgrp mosquitto``) keeps it so across ``fedge enroll`` and ``revoke``."""
    atomic_write(path, data, mode=mode, keep_owner=True)


def load_record(ca: CaDir, identity: str) -> dict[str, Any] | None:
    """``identity``'s issued-certificate record, or None if the CA never issued it one."""
    path = ca.record_path(identity)
    if not path.exists():
        return None
    record: dict[str, Any] = json.loads(path.read_text())
    return record


def save_record(ca: CaDir, identity: str, record: dict[str, Any]) -> None:
    """Replace ``identity``'s record atomically."""
    atomic_write(ca.record_path(identity), json.dumps(record, indent=2).encode())


def all_records(ca: CaDir) -> list[dict[str, Any]]:
    """Every issued-certificate record, in file-name order."""
    if not ca.issued.is_dir():
        return []
    return [json.loads(p.read_text()) for p in sorted(ca.issued.glob("*.json"))]


def record_certificate(
    ca: CaDir, identity: str, cert: x509.Certificate, key_fingerprint: str
) -> dict[str, Any]:
    """Append ``cert`` (issued with the signing key ``key_fingerprint``) to ``identity``'s
    record, making the record if it is the first; returns the record as saved."""
    record = load_record(ca, identity)
    if record is None:
        record = {"identity": identity, "certificates": []}
    record["certificates"].append(
        {
            "serial": format(cert.serial_number, "x"),
            "not_after": cert.not_valid_after_utc.isoformat(),
            "key_fingerprint": key_fingerprint,
            "revoked": None,
        }
    )
    save_record(ca, identity, record)
    return record


def mark_revoked(record: dict[str, Any], stamp: str) -> list[str]:
    """Mark every certificate not yet revoked as revoked at ``stamp``; their serials (hex)."""
    serials = []
    for c in record["certificates"]:
        if not c.get("revoked"):
            c["revoked"] = stamp
            serials.append(c["serial"])
    return serials


def revoked_certificates(ca: CaDir) -> Iterator[tuple[int, dt.datetime]]:
    """(serial, revocation time) of every revoked certificate the CA issued."""
    for record in all_records(ca):
        for c in record["certificates"]:
            if c.get("revoked"):
                yield int(c["serial"], 16), dt.datetime.fromisoformat(c["revoked"])
