"""``fedge enroll`` and ``fedge revoke``: a device's credentials in, and every one of them out.

Enrolling registers the device's public key in the key registry (``fedge.key_registry``;
``CA/keys`` unless ``--aggregator-keys`` names another). Revoking removes the broker password,
retires the key to ``revoked/`` and puts every certificate on the CRL. The broker applies the
password file and CRL on SIGHUP; ``aggregator.keyring`` notices the registry change by itself.
"""

from __future__ import annotations

from pathlib import Path

from fedge.errors import ConfigError
from fedge.key_registry import KeyRegistry
from fedge.topics import validate_device_id
from fedge_cli.pki.acl import privileged_names
from fedge_cli.pki.ca import write_crl
from fedge_cli.pki.cadir import (
    AGGREGATOR,
    MONITOR,
    CaDir,
    load_record,
    mark_revoked,
    save_record,
)
from fedge_cli.pki.certs import now
from fedge_cli.pki.credentials import give_aggregator_key, issue_credentials
from fedge_cli.pki.fleets import added_fleets, fleet_identities
from fedge_cli.pki.passwords import remove_password
from fedge_cli.pki.sites import RESERVED_PREFIXES

__all__ = ["check_device", "enroll", "revoke"]


def check_device(device: str, ca: CaDir | None = None) -> str:
    """``device`` if it is a valid device id that no ACL grants more than a device's rights.

    With ``ca``, the names of the ``user`` sections of its ``broker/acl`` and of the shipped
    ACLs are refused too (``fedge_cli.pki.acl``): a device enrolled as ``aggregator-1`` would
    read every device's updates under ``acl.sharded``; and so are the names reserved for
    sites (``site-*``, ``gw-*``: ``fedge_cli.pki.sites``), made only by ``fedge ca site``.
    """
    validate_device_id(device)
    if device in (AGGREGATOR, MONITOR):
        raise ConfigError(f"{device!r} is a service identity of the CA, not a device name")
    if ca is not None and device.startswith(RESERVED_PREFIXES):
        raise ConfigError(
            f"{device!r}: names starting {' or '.join(RESERVED_PREFIXES)} are a site's bridge "
            "and gateway (fedge ca site NAME makes them), not a device name"
        )
    if ca is not None and device in privileged_names([ca.acl]):
        raise ConfigError(
            f"{device!r} has its own section in a broker ACL (more rights than a device): "
            "choose another device name"
        )
    return device


def _registry(ca: CaDir, keyring: Path | None, fleet: str | None) -> KeyRegistry:
    return KeyRegistry(fleet_identities(ca, fleet).keys if keyring is None else Path(keyring))


def _registries(ca: CaDir, keyring: Path | None) -> list[KeyRegistry]:
    """``keyring``, or every key registry of the CA: its first fleet's and each added one's.
    A device id is one broker identity (one password), whichever fleet it serves."""
    if keyring is not None:
        return [KeyRegistry(Path(keyring))]
    return [KeyRegistry(ca.keys)] + [
        KeyRegistry(fleet_identities(ca, g).keys) for g in added_fleets(ca)
    ]


def enroll(
    ca_dir: Path,
    device: str,
    out: Path,
    keyring: Path | None = None,
    fleet: str | None = None,
) -> Path:
    """Make ``device``'s credentials in ``out`` and register its public key; returns ``out``.

    ``fleet``: a fleet added with ``fedge ca fleet`` (``fedge_cli.pki.fleets``): the device
    gets that fleet's aggregator key, and its key goes into that fleet's registry.
    """
    ca = CaDir(Path(ca_dir)).require()
    check_device(device, ca)
    ids = fleet_identities(ca, fleet)
    registry = _registry(ca, keyring, fleet)
    if any(r.is_enrolled(device) for r in {*_registries(ca, keyring), registry}):
        raise ConfigError(f"{device} is already enrolled; revoke it first: fedge revoke {device}")
    out = Path(out)
    signing_pub = issue_credentials(ca, device, out)
    give_aggregator_key(ca, out, source=ids.aggregator)
    registry.add(device, signing_pub)
    return out


def revoke(ca_dir: Path, device: str, keyring: Path | None = None) -> list[str]:
    """Remove the password, retire the public key (from ``keyring``, else from every key
    registry of the CA, whichever fleet the device serves), put every certificate on the CRL.

    Returns the revoked serials (hex). The broker applies the new password file and CRL on
    SIGHUP; ``aggregator.keyring`` notices the key registry change by itself.
    """
    ca = CaDir(Path(ca_dir)).require()
    # Without the ACL check: a name enrolled before it became privileged must stay revocable.
    check_device(device)
    record = load_record(ca, device)
    if record is None:
        raise ConfigError(f"{device} was never enrolled with the CA in {ca.root}")
    serials = mark_revoked(record, now().isoformat())
    save_record(ca, device, record)
    # The CRL first: a step that fails later (a damaged key file) must not leave the
    # certificates valid on the mutual-TLS listener.
    write_crl(ca.root)
    remove_password(ca.passwd, device)
    for registry in _registries(ca, keyring):
        registry.retire(device)
    return serials
