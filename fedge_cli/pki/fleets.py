"""Several fleets on one broker: ``fedge ca fleet G`` gives fleet G identities of its own.

Two aggregators both connecting as ``aggregator`` kick each other off the broker in a loop
(the client id is the username). The CA's first fleet (``fedge ca init --fleet F``) keeps the
``aggregator`` and ``monitor`` identities (``CA/aggregator``, ``CA/monitor``); each fleet added
with ``fedge ca fleet G`` gets ``aggregator.G`` and ``monitor.G`` in ``CA/fleets/G/``, its own
key registry ``CA/fleets/G/keys`` (its aggregator trusts only its own devices' keys) and a block
of the broker's ACL (``fedge_cli.pki.acl.render_fleet_block``): ``aggregator.G`` reads and
writes ``fedge/G/#`` only, and cannot publish another fleet's model or task.

``CA/fleet.json`` records the first fleet and the ACL template, so that adding a fleet or
``fedge ca broker-config --fleet`` re-renders the whole ACL from them::

    {"fleet": "plant7", "acl_template": "/path/to/broker_config/acl"}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from fedge.errors import ConfigError
from fedge.key_registry import KeyRegistry
from fedge.support.fsutil import atomic_write
from fedge.topics import validate_device_id
from fedge_cli.pki.acl import fleet_identity, render_acl, render_fleet_block
from fedge_cli.pki.cadir import AGGREGATOR, MONITOR, CaDir, load_record

__all__ = [
    "FleetIdentities",
    "add_fleet",
    "added_fleets",
    "fleet_identities",
    "render_ca_acl",
    "write_ca_acl",
]


@dataclass(frozen=True)
class FleetIdentities:
    """Where one fleet's identities and key registry are in a CA directory."""

    fleet: str
    aggregator: Path  # identity directory
    monitor: Path
    keys: Path
    aggregator_name: str
    monitor_name: str


def _record(ca: CaDir) -> dict[str, str]:
    if not ca.fleet_record.is_file():
        raise ConfigError(
            f"{ca.root} does not record its first fleet (made before fedge ca fleet existed): "
            "run fedge ca broker-config --fleet F once"
        )
    record: dict[str, str] = json.loads(ca.fleet_record.read_text())
    return record


def added_fleets(ca: CaDir) -> list[str]:
    """The fleets added with ``fedge ca fleet``, in name order."""
    return sorted(p.name for p in ca.fleets.iterdir()) if ca.fleets.is_dir() else []


def fleet_identities(ca: CaDir, fleet: str | None) -> FleetIdentities:
    """``fleet``'s identities; None or the first fleet: ``CA/aggregator``, ``CA/monitor``."""
    first = _record(ca)["fleet"] if ca.fleet_record.is_file() else None
    if fleet is None or fleet == first:
        return FleetIdentities(first or "", ca.aggregator, ca.monitor, ca.keys, AGGREGATOR, MONITOR)
    home = ca.fleets / validate_device_id(fleet)
    if not home.is_dir():
        raise ConfigError(f"fleet {fleet!r} is not in the CA {ca.root}: fedge ca fleet {fleet}")
    return FleetIdentities(
        fleet,
        home / AGGREGATOR,
        home / MONITOR,
        home / "keys",
        fleet_identity(AGGREGATOR, fleet),
        fleet_identity(MONITOR, fleet),
    )


def render_ca_acl(template: Path, first: str, added: list[str]) -> str:
    """The broker's ACL: ``template`` pinned to the first fleet, then a block per added one."""
    text = Path(template).read_text()
    return render_acl(text, first) + "".join(render_fleet_block(text, g) for g in added)


def write_ca_acl(ca: CaDir, first: str, template: Path) -> None:
    """Render ``CA/broker/acl`` for every fleet and site (``fedge ca site``) of the CA and
    record ``first`` and ``template`` in ``CA/fleet.json``."""
    from fedge_cli.pki.sites import site_acl_blocks

    acl = render_ca_acl(template, first, added_fleets(ca)) + site_acl_blocks(ca)
    atomic_write(ca.acl, acl.encode(), mode=0o644, keep_owner=True)
    record = {"fleet": first, "acl_template": str(Path(template).resolve())}
    atomic_write(ca.fleet_record, json.dumps(record, indent=2).encode(), mode=0o644)


def add_fleet(ca_dir: Path, fleet: str) -> FleetIdentities:
    """Fleet ``fleet``'s aggregator and monitor identities, key registry and ACL block."""
    from fedge_cli.pki.credentials import give_aggregator_key, issue_credentials

    ca = CaDir(Path(ca_dir)).require()
    validate_device_id(fleet)
    record = _record(ca)
    if fleet == record["fleet"] or (ca.fleets / fleet).exists():
        raise ConfigError(f"fleet {fleet!r} is already in the CA {ca.root}")
    names = (fleet_identity(AGGREGATOR, fleet), fleet_identity(MONITOR, fleet))
    taken = [n for n in names if load_record(ca, n) is not None]
    if taken:
        raise ConfigError(f"{taken[0]!r} is already enrolled (as a device?): revoke it first")
    home = ca.fleets / fleet
    home.mkdir(parents=True)
    os.chmod(home, 0o700)
    ids = fleet_identities(ca, fleet)
    KeyRegistry(ids.keys).create()
    issue_credentials(ca, ids.aggregator_name, ids.aggregator)
    give_aggregator_key(ca, ids.aggregator, source=ids.aggregator)
    issue_credentials(ca, ids.monitor_name, ids.monitor)
    write_ca_acl(ca, record["fleet"], Path(record["acl_template"]))
    return ids
