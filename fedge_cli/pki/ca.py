"""The fleet CA: ``fedge ca init`` (CA, broker files, key registry, aggregator identity) and
``fedge ca crl`` (the revocation list the broker reads on start and SIGHUP)."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from fedge.errors import ConfigError
from fedge.key_registry import KeyRegistry
from fedge_cli.pki.acl import render_acl
from fedge_cli.pki.broker_config import ACL_TEMPLATE
from fedge_cli.pki.cadir import AGGREGATOR, MONITOR, CaDir, revoked_certificates, write_file
from fedge_cli.pki.certs import (
    cert_pem,
    issue_certificate,
    key_pem,
    load_ca,
    new_ca_certificate,
    new_key,
    now,
)
from fedge_cli.pki.credentials import give_aggregator_key, issue_credentials
from fedge_cli.pki.passwords import PASSWD_MODE

__all__ = ["CRL_DAYS", "DEFAULT_FLEET", "DEFAULT_HOSTS", "init_ca", "write_crl"]

CRL_DAYS = 365
DEFAULT_HOSTS = ("localhost", "127.0.0.1")
DEFAULT_FLEET = "default"  # the roles' default fleet (fedge.topics.Topics)


def init_ca(
    ca_dir: Path, hosts: tuple[str, ...] = DEFAULT_HOSTS, fleet: str = DEFAULT_FLEET
) -> CaDir:
    """A new CA, the broker's server certificate, an empty CRL, the aggregator and monitor
    identities, and the broker's ACL pinned to ``fleet`` (``fedge_cli.pki.acl.render_acl``;
    ``CA/fleet.json`` records ``fleet``, ``fedge_cli.pki.fleets``)."""
    ca = CaDir(Path(ca_dir))
    if ca.ca_crt.exists():
        raise ConfigError(f"{ca.root} already holds a CA; choose another --dir")
    if not hosts:
        raise ConfigError("the broker certificate needs at least one --host")
    # Read before anything is written: a missing template must not leave a half-made CA.
    acl = render_acl(ACL_TEMPLATE.read_text(), fleet).encode()
    existed = ca.root.exists()
    before = set(ca.root.iterdir()) if existed else set()
    try:
        _make_ca(ca, hosts, acl)
        record = {"fleet": fleet, "acl_template": str(ACL_TEMPLATE.resolve())}
        write_file(ca.fleet_record, json.dumps(record, indent=2).encode(), 0o644)
    except BaseException:
        # A half-made CA would be refused by the next `ca init` ("already holds a CA") and
        # half-work for `enroll`: remove what this call made, and nothing else.
        if not existed:
            shutil.rmtree(ca.root, ignore_errors=True)
        else:
            for p in set(ca.root.iterdir()) - before:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        raise
    return ca


def _make_ca(ca: CaDir, hosts: tuple[str, ...], acl: bytes) -> None:
    ca.root.mkdir(parents=True, exist_ok=True)
    for d in (ca.ca_key.parent, ca.broker, ca.issued):
        d.mkdir(parents=True, exist_ok=True)
    KeyRegistry(ca.keys).create()
    os.chmod(ca.ca_key.parent, 0o700)
    key = new_key()
    write_file(ca.ca_key, key_pem(key), 0o600)
    write_file(ca.ca_crt, cert_pem(new_ca_certificate(key)), 0o644)
    shutil.copyfile(ca.ca_crt, ca.broker / "ca.crt")
    server_key = new_key()
    server = issue_certificate(ca, hosts[0], server_key, server_names=hosts)
    write_file(ca.server_key, key_pem(server_key), 0o640)
    write_file(ca.server_crt, cert_pem(server), 0o644)
    write_file(ca.acl, acl, 0o644)
    write_file(ca.passwd, b"", PASSWD_MODE)
    write_crl(ca.root)
    issue_credentials(ca, AGGREGATOR, ca.aggregator)
    give_aggregator_key(ca, ca.aggregator)
    # fedge status's read-only identity: its password is in CA/monitor/password.
    issue_credentials(ca, MONITOR, ca.monitor)


def write_crl(ca_dir: Path, days: int = CRL_DAYS) -> Path:
    """(Re-)sign the CRL with every revoked serial; the broker reads it on start and SIGHUP."""
    ca = CaDir(Path(ca_dir)).require()
    ca_cert, ca_key = load_ca(ca)
    stamp = now()
    b = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(stamp)
        .next_update(stamp + dt.timedelta(days=days))
        .add_extension(x509.CRLNumber(_next_crl_number(ca.crl, stamp)), critical=False)
    )
    for serial, revoked_at in revoked_certificates(ca):
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(revoked_at)
            .build()
        )
    crl = b.sign(ca_key, hashes.SHA256())
    write_file(ca.crl, crl.public_bytes(serialization.Encoding.PEM), 0o644)
    return ca.crl


def _next_crl_number(path: Path, stamp: dt.datetime) -> int:
    """The time in seconds, but always above the current CRL's number (RFC 5280 §5.2.3:
    it increases; two CRLs signed in one second would otherwise share it)."""
    number = int(stamp.timestamp())
    if path.exists():
        try:
            old = x509.load_pem_x509_crl(path.read_bytes())
            ext = old.extensions.get_extension_for_class(x509.CRLNumber)
            number = max(number, ext.value.crl_number + 1)
        except (ValueError, x509.ExtensionNotFound):
            pass  # an unreadable CRL is replaced; its number cannot be honoured
    return number
