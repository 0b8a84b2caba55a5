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

Several fleets on one broker (``fedge ca fleet``): ``render_fleet_block`` derives from the same
template a block for one more fleet ``G``: its ``pattern`` lines pinned to ``fedge/G/``, and
each ``user NAME`` section as ``user NAME.G`` pinned to ``fedge/G/`` (``aggregator.G`` writes
fleet G's model and task and nothing of another fleet; ``monitor.G`` reads G's statuses).
``deny`` lines are never pinned: they keep denying under every fleet.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from fedge.support.shipped import broker_config_dir
from fedge.topics import validate_device_id

__all__ = [
    "SHIPPED_ACLS",
    "acl_users",
    "fleet_identity",
    "privileged_names",
    "render_acl",
    "render_fleet_block",
]

SHIPPED_ACLS = broker_config_dir()

# Mosquitto reads "user <name>" with the rest of the line as the name (spaces included).
_USER_LINE = re.compile(r"^user\s+(.+?)\s*$")


def render_acl(text: str, fleet: str) -> str:
    """``text`` (an ACL for every fleet) with each topic pinned to ``fleet``.

    Only ``pattern`` and ``topic`` lines change: ``fedge/+/`` becomes ``fedge/<fleet>/`` and a
    whole-tree ``fedge/#`` becomes ``fedge/<fleet>/#``; ``deny`` lines keep every fleet;
    comments stay as written.
    """
    validate_device_id(fleet)  # a fleet name is one topic level, like a device id
    return "".join(_pin(line, fleet) for line in text.splitlines(keepends=True))


def _pin(line: str, fleet: str) -> str:
    words = line.split()
    if not words or words[0] not in ("pattern", "topic") or words[1:2] == ["deny"]:
        return line
    line = line.replace("fedge/+/", f"fedge/{fleet}/")
    return re.sub(r"fedge/#(?=\s|$)", f"fedge/{fleet}/#", line)


def fleet_identity(name: str, fleet: str) -> str:
    """The name of ACL section ``name`` (``aggregator``, ``monitor``) for an added ``fleet``."""
    return validate_device_id(f"{name}.{validate_device_id(fleet)}")


def render_fleet_block(text: str, fleet: str) -> str:
    """The rules of ``text`` for one more fleet on the broker (module docstring): its pattern
    lines and its user sections renamed ``<name>.<fleet>``, all pinned to ``fleet``."""
    out = [f"\n# --- fleet {fleet} (fedge ca fleet {fleet}) ---\n"]
    user: tuple[str, str] | None = None  # (name in the template, name for this fleet)
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if (m := _USER_LINE.match(line.strip())) is not None:
            user = (m.group(1), fleet_identity(m.group(1), fleet))
            out.append(f"\nuser {user[1]}\n")
        elif words[0] == "pattern":
            out.append(_pin(line.strip(), fleet) + "\n")
        elif words[0] == "topic" and user is not None:
            # A section's own topics (status/monitor, partial/aggregator-0) take its new name.
            own = re.sub(rf"/{re.escape(user[0])}$", f"/{user[1]}", line.strip())
            out.append(_pin(own, fleet) + "\n")
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
