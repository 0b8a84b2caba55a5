"""The file layout of a CA directory, and the issued-certificate records kept in it.

The layout is drawn in the package docstring (``fedge_cli.pki``). ``issued/<id>.json`` holds
one record per identity: ``{"identity": id, "certificates": [{"serial", "not_after",
"key_fingerprint", "revoked"}, ...]}``, ``revoked`` an ISO time or null. The CRL is signed from
these records (``fedge_cli.pki.ca.write_crl``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedge.errors import ConfigError
from fedge.support.fsutil import atomic_write

__all__ = [
    "AGGREGATOR",
    "CaDir",
    "all_records",
    "load_record",
    "save_record",
    "write_file",
]

AGGREGATOR = "aggregator"


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

    def require(self) -> CaDir:
        if not self.ca_crt.is_file() or not self.ca_key.is_file():
            raise ConfigError(
                f"{self.root} is not a CA directory; make one: fedge ca init --dir DIR"
            )
        return self

    def record_path(self, identity: str) -> Path:
        return self.issued / f"{identity}.json"


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` atomically with ``data``, then set ``mode``."""
    atomic_write(path, data)
    os.chmod(path, mode)


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
