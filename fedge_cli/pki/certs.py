"""X.509 building blocks: ECDSA P-256 keys, the self-signed fleet CA, certificates it issues.

P-256 because every TLS stack a device may carry speaks it. Certificates start five minutes in
the past so a device whose clock runs a little behind still accepts them.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedge.errors import ConfigError
from fedge_cli.pki.cadir import CaDir

__all__ = [
    "CA_DAYS",
    "CERT_DAYS",
    "cert_pem",
    "issue_certificate",
    "key_pem",
    "load_ca",
    "new_ca_certificate",
    "new_key",
    "now",
]

CA_DAYS, CERT_DAYS = 3650, 825
_BACKDATE = dt.timedelta(minutes=5)


def now() -> dt.datetime:
    """UTC now, to the second (what certificates and CRLs carry)."""
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM (the file's mode protects it)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_ca(ca: CaDir) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA certificate and its private key from ``ca``."""
    cert = x509.load_pem_x509_certificate(ca.ca_crt.read_bytes())
    key = serialization.load_pem_private_key(ca.ca_key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{ca.ca_key} is not an EC key")
    return cert, key


def new_ca_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    """A self-signed CA certificate for ``key``, allowed to sign certificates and CRLs only."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fedge CA {secrets.token_hex(4)}")])
    start = now()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - _BACKDATE)
        .not_valid_after(start + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def issue_certificate(
    ca: CaDir, cn: str, key: ec.EllipticCurvePrivateKey, *, server_names: tuple[str, ...] = ()
) -> x509.Certificate:
    """A certificate for ``key`` signed by ``ca``: a TLS client's, or with ``server_names``
    (host names or IP addresses, as SANs) a TLS server's."""
    ca_cert, ca_key = load_ca(ca)
    start = now()
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - _BACKDATE)
        .not_valid_after(start + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if server_names:
        b = b.add_extension(x509.SubjectAlternativeName(_sans(server_names)), critical=False)
        usage = ExtendedKeyUsageOID.SERVER_AUTH
    else:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH
    b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return b.sign(ca_key, hashes.SHA256())


def _sans(names: tuple[str, ...]) -> list[x509.GeneralName]:
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    return sans
