"""One identity's credentials: broker password, TLS client certificate, Ed25519 signing key.

An identity directory (``fedge enroll`` output, and ``CA/aggregator``) holds ``password``
(0600), ``client.crt`` + ``client.key`` (0600), ``ca.crt``, ``signing.key`` (Ed25519, 0600),
``signing.pub`` and ``identity.json``; ``enroll`` adds ``aggregator.pub`` (the key that signs
models). Issuing also adds the password to the broker's password file and the certificate to
the identity's record in ``CA/issued/``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cryptography import x509

from fedge.identity import SigningKey, save_signing_key, save_verify_key
from fedge_cli.pki.cadir import CaDir, load_record, save_record, write_file
from fedge_cli.pki.certs import cert_pem, issue_certificate, key_pem, new_key
from fedge_cli.pki.passwords import new_password, set_password

__all__ = ["IDENTITY_FILES", "issue_credentials"]

# identity.json: where a client finds each credential, relative to the identity directory
IDENTITY_FILES = {
    "password_file": "password",
    "ca_cert": "ca.crt",
    "client_cert": "client.crt",
    "client_key": "client.key",
    "signing_key": "signing.key",
    "aggregator_key": "aggregator.pub",
}


def issue_credentials(ca: CaDir, name: str, out: Path) -> dict[str, Any]:
    """Password, client certificate, Ed25519 key for ``name``, written into ``out`` (0700).

    Returns ``name``'s issued-certificate record with the new certificate appended.
    """
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    password = new_password()
    key = new_key()
    cert = issue_certificate(ca, name, key)
    signing = SigningKey.generate()
    write_file(out / "password", password.encode(), 0o600)
    write_file(out / "client.key", key_pem(key), 0o600)
    write_file(out / "client.crt", cert_pem(cert), 0o644)
    write_file(out / "ca.crt", ca.ca_crt.read_bytes(), 0o644)
    save_signing_key(out / "signing.key", signing)
    save_verify_key(out / "signing.pub", signing.verify_key)
    set_password(ca.passwd, name, password)
    record = _record_certificate(ca, name, cert, signing)
    (out / "identity.json").write_text(
        json.dumps({"identity": name, "username": name, **IDENTITY_FILES}, indent=2)
    )
    return record


def _record_certificate(
    ca: CaDir, name: str, cert: x509.Certificate, signing: SigningKey
) -> dict[str, Any]:
    record = load_record(ca, name)
    if record is None:
        record = {"identity": name, "certificates": []}
    record["certificates"].append(
        {
            "serial": format(cert.serial_number, "x"),
            "not_after": cert.not_valid_after_utc.isoformat(),
            "key_fingerprint": signing.verify_key.fingerprint,
            "revoked": None,
        }
    )
    save_record(ca, name, record)
    return record
