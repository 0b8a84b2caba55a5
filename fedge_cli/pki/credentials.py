"""One identity's credentials: broker password, TLS client certificate, Ed25519 signing key.

An identity directory (``fedge enroll`` output, and ``CA/aggregator``) holds ``password``
(0600), ``client.crt`` + ``client.key`` (0600), ``ca.crt``, ``signing.key`` (Ed25519, 0600),
``signing.pub``, ``aggregator.pub`` (the key that signs models) and ``identity.json``.
Issuing also adds the password to the broker's password file and the certificate to the
identity's record in ``CA/issued/``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from fedge.identity import SigningKey, VerifyKey, save_signing_key, save_verify_key
from fedge_cli.pki.cadir import CaDir, record_certificate, write_file
from fedge_cli.pki.certs import cert_pem, issue_certificate, key_pem, new_key
from fedge_cli.pki.passwords import new_password, set_password

__all__ = ["IDENTITY_FILES", "SIGNING_PUB", "give_aggregator_key", "issue_credentials"]

SIGNING_PUB = "signing.pub"
# identity.json: where a client finds each credential, relative to the identity directory
IDENTITY_FILES = {
    "password_file": "password",
    "ca_cert": "ca.crt",
    "client_cert": "client.crt",
    "client_key": "client.key",
    "signing_key": "signing.key",
    "aggregator_key": "aggregator.pub",
}


def issue_credentials(ca: CaDir, name: str, out: Path) -> VerifyKey:
    """Password, client certificate, Ed25519 key for ``name``, written into ``out`` (0700).

    Returns the new public signing key (what the key registry holds for a device).
    """
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    password = new_password()
    key = new_key()
    cert = issue_certificate(ca, name, key)
    signing = SigningKey.generate()
    write_file(out / IDENTITY_FILES["password_file"], password.encode(), 0o600)
    write_file(out / IDENTITY_FILES["client_key"], key_pem(key), 0o600)
    write_file(out / IDENTITY_FILES["client_cert"], cert_pem(cert), 0o644)
    write_file(out / IDENTITY_FILES["ca_cert"], ca.ca_crt.read_bytes(), 0o644)
    save_signing_key(out / IDENTITY_FILES["signing_key"], signing)
    save_verify_key(out / SIGNING_PUB, signing.verify_key)
    set_password(ca.passwd, name, password)
    record_certificate(ca, name, cert, signing.verify_key.fingerprint)
    identity = {"identity": name, "username": name, **IDENTITY_FILES}
    write_file(out / "identity.json", json.dumps(identity, indent=2).encode(), 0o644)
    return signing.verify_key


def give_aggregator_key(ca: CaDir, out: Path, source: Path | None = None) -> None:
    """Copy the public signing key of the aggregator whose identity is in ``source``
    (default: the CA's first fleet's, ``CA/aggregator``) into the identity directory ``out``."""
    src = ca.aggregator if source is None else source
    shutil.copyfile(src / SIGNING_PUB, out / IDENTITY_FILES["aggregator_key"])
