"""What the broker's ACL files say about identities: the names no device may take.

Mosquitto gives a ``user NAME`` section of an ACL file rights beyond the ``pattern`` lines
every client has (``aggregator`` writes the model; a shard worker ``aggregator-N`` of
``broker_config/acl.sharded`` reads every device's updates). A device enrolled under such a
name would hold those rights, so ``fedge enroll`` refuses every name that any of these files
grants a section to: the CA's own ``broker/acl`` and every ``acl*`` file shipped in
``broker_config/`` (an operator may switch to ``acl.sharded`` after enrolling). The list is
read from the files each time, never kept by hand.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

__all__ = ["SHIPPED_ACLS", "acl_users", "privileged_names"]

SHIPPED_ACLS = Path(__file__).resolve().parents[2] / "broker_config"

# Mosquitto reads "user <name>" with the rest of the line as the name (spaces included).
_USER_LINE = re.compile(r"^user\s+(.+?)\s*$")


def acl_users(text: str) -> set[str]:
    """The names of the ``user`` sections of one Mosquitto ACL file."""
    return {m.group(1) for line in text.splitlines() if (m := _USER_LINE.match(line.strip()))}


def privileged_names(acl_files: Iterable[Path]) -> set[str]:
    """Every name given a ``user`` section by ``acl_files`` and by the shipped ACLs."""
    files = [*acl_files, *sorted(SHIPPED_ACLS.glob("acl*"))]
    names: set[str] = set()
    for path in files:
        if path.is_file():
            names |= acl_users(path.read_text())
    return names
