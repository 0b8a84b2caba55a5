"""The broker's ACL: rendered for one fleet, and the names no device may take.

``render_acl`` pins a shipped ACL (``broker_config/acl``, ``acl.sharded``), written for any
fleet (``fedge/+/...``, ``fedge/#``), to one fleet: ``fedge/<fleet>/...``. With the ``+``, a
device could publish retained messages on ``fedge/<any name>/update/<itself>`` and
``.../status/<itself>``, one per fleet name it invents, and grow the broker without bound
(issue 17: 150 x 1 MiB took it from 26 to 171 MB). Pinned, a device owns two topics.

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

from fedge.support.shipped import broker_config_dir
from fedge.topics import validate_device_id

__all__ = ["SHIPPED_ACLS", "acl_users", "privileged_names", "render_acl"]

SHIPPED_ACLS = broker_config_dir()

# Mosquitto reads "user <name>" with the rest of the line as the name (spaces included).
_USER_LINE = re.compile(r"^user\s+(.+?)\s*$")


def render_acl(text: str, fleet: str) -> str:
    """``text`` (an ACL for every fleet) with each topic pinned to ``fleet``.

    Only ``pattern`` and ``topic`` lines change: ``fedge/+/`` becomes ``fedge/<fleet>/`` and a
    whole-tree ``fedge/#`` becomes ``fedge/<fleet>/#``; comments stay as written.
    """
    validate_device_id(fleet)  # a fleet name is one topic level, like a device id
    out = []
    for line in text.splitlines(keepends=True):
        words = line.split()
        if words and words[0] in ("pattern", "topic"):
            line = line.replace("fedge/+/", f"fedge/{fleet}/")
            line = re.sub(r"fedge/#(?=\s|$)", f"fedge/{fleet}/#", line)
        out.append(line)
    return "".join(out)


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
