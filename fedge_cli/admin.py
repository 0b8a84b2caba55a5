"""Fleet identity administration: ``fedge ca init|crl|broker-config``, ``fedge enroll``,
``fedge revoke``.

A CA directory (``fedge ca init --dir CA``) holds everything the fleet's trust rests on::

    CA/ca.crt                   the fleet CA certificate (public: every client and the broker)
    CA/private/ca.key           its key, 0600 (keep this directory offline if you can)
    CA/broker/                  what Mosquitto reads: server.crt/.key, passwd, crl.pem, acl
    CA/issued/<id>.json         certificates issued to an identity, and whether revoked
    CA/keys/devices/<id>.pub    the key registry the aggregator reads (aggregator.keyring)
    CA/keys/revoked/<id>-<fp>.pub   keys of revoked devices
    CA/aggregator/              the aggregator's own identity (made by ``ca init``)

An identity directory (``enroll`` output, and ``CA/aggregator``) holds ``password`` (0600),
``client.crt`` + ``client.key`` (0600), ``ca.crt``, ``signing.key`` (Ed25519, 0600),
``signing.pub``, ``aggregator.pub`` (the key that signs models) and ``identity.json``.

TLS certificates are ECDSA P-256 (every TLS stack a device may carry speaks it); signing keys
are Ed25519 (``fedge.identity``). Broker passwords are random 32-character tokens, hashed into
the password file by ``mosquitto_passwd`` (fed on stdin, so the password never shows in a
process list) or, where it is not installed, in its ``$7$`` PBKDF2-SHA512 format directly.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedge.errors import ConfigError
from fedge.identity import SigningKey, load_verify_key, save_signing_key, save_verify_key
from fedge.support.fsutil import atomic_write
from fedge.topics import validate_device_id

__all__ = [
    "AGGREGATOR",
    "CaDir",
    "add_arguments",
    "enroll",
    "hash_password",
    "init_ca",
    "remove_password",
    "render_broker_config",
    "revoke",
    "set_password",
    "verify_password",
    "write_crl",
]

AGGREGATOR = "aggregator"
PRODUCTION_TEMPLATE = Path(__file__).resolve().parents[1] / "broker_config" / "production.conf"
_ACL = PRODUCTION_TEMPLATE.parent / "acl"
_CA_DAYS, _CERT_DAYS, _CRL_DAYS = 3650, 825, 365
_PW_ITERATIONS, _PW_SALT = 101, 12  # what mosquitto_passwd 2.0 writes


@dataclass(frozen=True)
class CaDir:
    """The file layout of a CA directory (module docstring)."""

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


# -- x509 ------------------------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    atomic_write(path, data)
    os.chmod(path, mode)


def _load_ca(ca: CaDir) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(ca.ca_crt.read_bytes())
    key = serialization.load_pem_private_key(ca.ca_key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{ca.ca_key} is not an EC key")
    return cert, key


def _issue(
    ca: CaDir, cn: str, key: ec.EllipticCurvePrivateKey, *, server_names: tuple[str, ...] = ()
) -> x509.Certificate:
    ca_cert, ca_key = _load_ca(ca)
    now = _now()
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=_CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if server_names:
        sans: list[x509.GeneralName] = []
        for name in server_names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        usage = ExtendedKeyUsageOID.SERVER_AUTH
    else:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH
    b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return b.sign(ca_key, hashes.SHA256())


def write_crl(ca_dir: Path, days: int = _CRL_DAYS) -> Path:
    """(Re-)sign the CRL with every revoked serial; the broker reads it on start and SIGHUP."""
    ca = CaDir(Path(ca_dir)).require()
    ca_cert, ca_key = _load_ca(ca)
    now = _now()
    b = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(now + dt.timedelta(days=days))
        .add_extension(x509.CRLNumber(int(now.timestamp())), critical=False)
    )
    for record in _records(ca):
        for c in record["certificates"]:
            if c.get("revoked"):
                revoked_at = dt.datetime.fromisoformat(c["revoked"])
                b = b.add_revoked_certificate(
                    x509.RevokedCertificateBuilder()
                    .serial_number(int(c["serial"], 16))
                    .revocation_date(revoked_at)
                    .build()
                )
    crl = b.sign(ca_key, hashes.SHA256())
    _write(ca.crl, crl.public_bytes(serialization.Encoding.PEM), 0o644)
    return ca.crl


def _records(ca: CaDir) -> list[dict[str, Any]]:
    if not ca.issued.is_dir():
        return []
    return [json.loads(p.read_text()) for p in sorted(ca.issued.glob("*.json"))]


# -- mosquitto password file ---------------------------------------------------------------


def hash_password(
    password: str, salt: bytes | None = None, iterations: int = _PW_ITERATIONS
) -> str:
    """``$7$ITER$b64(salt)$b64(PBKDF2-HMAC-SHA512)``: Mosquitto 2.0's password hash format."""
    salt = secrets.token_bytes(_PW_SALT) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(entry_hash: str, password: str) -> bool:
    """True if ``password`` matches a ``$7$`` hash from a Mosquitto password file."""
    parts = entry_hash.split("$")
    if len(parts) != 5 or parts[1] != "7":
        return False
    salt = base64.b64decode(parts[3])
    return hmac.compare_digest(hash_password(password, salt, int(parts[2])), entry_hash)


def _passwd_lines(passwd: Path) -> list[str]:
    return passwd.read_text().splitlines() if passwd.exists() else []


def set_password(passwd: Path, username: str, password: str) -> None:
    """Add or replace ``username`` in a Mosquitto password file (mode 0640)."""
    passwd = Path(passwd)
    if not passwd.exists():
        _write(passwd, b"", 0o640)
    tool = shutil.which("mosquitto_passwd")
    if tool is not None:
        run = subprocess.run(
            [tool, str(passwd), username],
            input=f"{password}\n{password}\n",
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if run.returncode != 0:
            raise ConfigError(f"mosquitto_passwd failed for {username}: {run.stderr.strip()}")
    else:
        keep = [ln for ln in _passwd_lines(passwd) if ln.split(":", 1)[0] != username]
        keep.append(f"{username}:{hash_password(password)}")
        atomic_write(passwd, ("\n".join(keep) + "\n").encode())
    os.chmod(passwd, 0o640)


def remove_password(passwd: Path, username: str) -> bool:
    """Delete ``username`` from the password file; False if it was not there."""
    lines = _passwd_lines(Path(passwd))
    keep = [ln for ln in lines if ln.split(":", 1)[0] != username]
    if len(keep) == len(lines):
        return False
    atomic_write(Path(passwd), ("\n".join(keep) + "\n" if keep else "").encode())
    os.chmod(passwd, 0o640)
    return True


# -- identities ------------------------------------------------------------------------------


def _issue_identity(ca: CaDir, name: str, out: Path) -> dict[str, Any]:
    """Password, client certificate, Ed25519 key for ``name``, written into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    password = secrets.token_urlsafe(24)
    key = _new_key()
    cert = _issue(ca, name, key)
    signing = SigningKey.generate()
    _write(out / "password", password.encode(), 0o600)
    _write(out / "client.key", _key_pem(key), 0o600)
    _write(out / "client.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(out / "ca.crt", ca.ca_crt.read_bytes(), 0o644)
    save_signing_key(out / "signing.key", signing)
    save_verify_key(out / "signing.pub", signing.verify_key)
    set_password(ca.passwd, name, password)
    record: dict[str, Any] = {"identity": name, "certificates": []}
    path = ca.issued / f"{name}.json"
    if path.exists():
        record = json.loads(path.read_text())
    record["certificates"].append(
        {
            "serial": format(cert.serial_number, "x"),
            "not_after": cert.not_valid_after_utc.isoformat(),
            "key_fingerprint": signing.verify_key.fingerprint,
            "revoked": None,
        }
    )
    atomic_write(path, json.dumps(record, indent=2).encode())
    (out / "identity.json").write_text(
        json.dumps(
            {
                "identity": name,
                "username": name,
                "password_file": "password",
                "ca_cert": "ca.crt",
                "client_cert": "client.crt",
                "client_key": "client.key",
                "signing_key": "signing.key",
                "aggregator_key": "aggregator.pub",
            },
            indent=2,
        )
    )
    return record


def init_ca(ca_dir: Path, hosts: tuple[str, ...] = ("localhost", "127.0.0.1")) -> CaDir:
    """A new CA, the broker's server certificate, an empty CRL, and the aggregator identity."""
    ca = CaDir(Path(ca_dir))
    if ca.ca_crt.exists():
        raise ConfigError(f"{ca.root} already holds a CA; choose another --dir")
    if not hosts:
        raise ConfigError("the broker certificate needs at least one --host")
    ca.root.mkdir(parents=True, exist_ok=True)
    for d in (ca.ca_key.parent, ca.broker, ca.issued, ca.keys / "devices", ca.keys / "revoked"):
        d.mkdir(parents=True, exist_ok=True)
    os.chmod(ca.ca_key.parent, 0o700)
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fedge CA {secrets.token_hex(4)}")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(ca.ca_key, _key_pem(key), 0o600)
    _write(ca.ca_crt, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    shutil.copyfile(ca.ca_crt, ca.broker / "ca.crt")
    server_key = _new_key()
    server = _issue(ca, hosts[0], server_key, server_names=hosts)
    _write(ca.server_key, _key_pem(server_key), 0o640)
    _write(ca.server_crt, server.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(ca.acl, _ACL.read_bytes(), 0o644)
    _write(ca.passwd, b"", 0o640)
    write_crl(ca.root)
    _issue_identity(ca, AGGREGATOR, ca.aggregator)
    shutil.copyfile(ca.aggregator / "signing.pub", ca.aggregator / "aggregator.pub")
    return ca


def _check_device(device: str) -> str:
    validate_device_id(device)
    if device == AGGREGATOR:
        raise ConfigError(f"{AGGREGATOR!r} is the aggregator's identity, not a device name")
    return device


def enroll(ca_dir: Path, device: str, out: Path, keyring: Path | None = None) -> Path:
    """Make ``device``'s credentials in ``out`` and register its public key; returns ``out``."""
    ca = CaDir(Path(ca_dir)).require()
    _check_device(device)
    keyring = ca.keys if keyring is None else Path(keyring)
    registered = keyring / "devices" / f"{device}.pub"
    if registered.exists():
        raise ConfigError(f"{device} is already enrolled; revoke it first: fedge revoke {device}")
    out = Path(out)
    _issue_identity(ca, device, out)
    shutil.copyfile(ca.aggregator / "signing.pub", out / "aggregator.pub")
    save_verify_key(registered, load_verify_key(out / "signing.pub"))
    return out


def revoke(ca_dir: Path, device: str, keyring: Path | None = None) -> list[str]:
    """Remove the password, retire the public key, put every certificate on the CRL.

    Returns the revoked serials (hex). The broker applies the new password file and CRL on
    SIGHUP; ``aggregator.keyring`` notices the key registry change by itself.
    """
    ca = CaDir(Path(ca_dir)).require()
    _check_device(device)
    keyring = ca.keys if keyring is None else Path(keyring)
    path = ca.issued / f"{device}.json"
    if not path.exists():
        raise ConfigError(f"{device} was never enrolled with the CA in {ca.root}")
    record = json.loads(path.read_text())
    stamp = _now().isoformat()
    serials = []
    for c in record["certificates"]:
        if not c.get("revoked"):
            c["revoked"] = stamp
            serials.append(c["serial"])
    atomic_write(path, json.dumps(record, indent=2).encode())
    remove_password(ca.passwd, device)
    registered = keyring / "devices" / f"{device}.pub"
    if registered.exists():
        retired = keyring / "revoked" / f"{device}-{load_verify_key(registered).fingerprint}.pub"
        retired.parent.mkdir(parents=True, exist_ok=True)
        os.replace(registered, retired)
    write_crl(ca.root)
    return serials


# -- broker config ---------------------------------------------------------------------------


def render_broker_config(
    ca_dir: Path, template: Path = PRODUCTION_TEMPLATE, **values: object
) -> str:
    """``production.conf`` with the CA's files filled in, and ``values`` for the rest.

    Placeholders not given stay as ``{name}``, so a caller (the test suite, through
    ``simulation.broker.MosquittoBroker``) can fill ``{port}``, ``{data_dir}``, ``{acl_file}``
    and ``{log_file}`` itself.
    """
    ca = CaDir(Path(ca_dir)).require()
    filled: dict[str, object] = {
        "password_file": ca.passwd,
        "cafile": ca.ca_crt,
        "certfile": ca.server_crt,
        "keyfile": ca.server_key,
        "crlfile": ca.crl,
        "acl_file": ca.acl,
        **values,
    }
    text = Path(template).read_text()
    for name, value in filled.items():
        text = text.replace("{" + name + "}", str(value))
    return text


def _broker_config(args: argparse.Namespace) -> None:
    import re

    ca = CaDir(args.dir).require()
    data_dir = args.data_dir.resolve()
    if not data_dir.is_dir():
        raise ConfigError(
            f"data directory {data_dir} does not exist; create it for the broker user"
        )
    problem = _access_problem(data_dir, args.user, write=True)
    problem = problem or next(
        (p for f in (ca.server_key, ca.passwd, ca.crl) if (p := _access_problem(f, args.user))),
        None,
    )
    if problem:
        # Mosquitto would start, log "Permission denied" once, and lose every session and
        # retained model on restart (persistence), or refuse every TLS client (key, CRL).
        raise ConfigError(problem)
    text = render_broker_config(
        ca.root,
        port=args.port,
        mtls_port=args.mtls_port,
        bind=args.bind,
        data_dir=data_dir,
        log_file=args.log_file.resolve(),
    )
    left = sorted(set(re.findall(r"\{(\w+)\}", text)))
    if left:
        raise ConfigError(f"unfilled placeholders in the template: {', '.join(left)}")
    atomic_write(args.out, text.encode())
    print(f"wrote {args.out}; run: mosquitto -c {args.out}")
    print(
        f"the broker user must read {ca.broker} and write {data_dir}, e.g.: "
        f"chown -R mosquitto: {ca.broker} {data_dir}"
    )


def _access_problem(path: Path, user: str, write: bool = False) -> str | None:
    """Why the broker, started as root and dropping to ``user``, could not use ``path``."""
    import grp
    import pwd

    want = "writable" if write else "readable"
    if os.geteuid() != 0:  # Mosquitto runs as whoever starts it: our access is its access
        ok = os.access(path, (os.W_OK | os.X_OK) if write else os.R_OK)
        return None if ok else f"{path} is not {want} by this user"
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return f"no user {user!r} on this machine: the broker drops to it when started as root"
    st = path.stat()
    gids = {pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    shift = 6 if st.st_uid == pw.pw_uid else 3 if st.st_gid in gids else 0
    need = 0o3 if write else 0o4
    if (st.st_mode >> shift) & need != need:
        return f"{path} is not {want} by the broker user {user!r}; run: chown {user}: {path}"
    return None


# -- command line ----------------------------------------------------------------------------


def _ca_init(args: argparse.Namespace) -> None:
    ca = init_ca(args.dir, tuple(args.host or ("localhost", "127.0.0.1")))
    print(f"CA in {ca.root}; broker files in {ca.broker}; aggregator identity in {ca.aggregator}")


def _ca_crl(args: argparse.Namespace) -> None:
    print(f"wrote {write_crl(args.dir, args.days)}; send SIGHUP to the broker to load it")


def _enroll(args: argparse.Namespace) -> None:
    out = enroll(args.ca, args.device, args.out, args.aggregator_keys)
    print(f"enrolled {args.device}: credentials in {out}; send SIGHUP to the broker")


def _revoke(args: argparse.Namespace) -> None:
    serials = revoke(args.ca, args.device, args.aggregator_keys)
    print(
        f"revoked {args.device} (certificates {', '.join(serials) or 'none'}); "
        f"send SIGHUP to the broker to apply the password file and CRL"
    )


def add_arguments(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``ca``, ``enroll`` and ``revoke`` on the ``fedge`` sub-command parser."""
    ca = sub.add_parser("ca", help="the fleet's certificate authority and broker config")
    csub = ca.add_subparsers(dest="ca_cmd", required=True, metavar="{init,crl,broker-config}")
    init = csub.add_parser("init", help="new CA, broker certificate and aggregator identity")
    init.add_argument("--dir", type=Path, required=True)
    init.add_argument(
        "--host",
        action="append",
        default=None,
        help="broker host name or IP for its certificate (repeat; default localhost, 127.0.0.1)",
    )
    init.set_defaults(func=_ca_init)
    crl = csub.add_parser("crl", help="re-sign the CRL before its nextUpdate date")
    crl.add_argument("--dir", type=Path, required=True)
    crl.add_argument("--days", type=int, default=_CRL_DAYS)
    crl.set_defaults(func=_ca_crl)
    bc = csub.add_parser("broker-config", help="render broker_config/production.conf")
    bc.add_argument("--dir", type=Path, required=True)
    bc.add_argument("--data-dir", type=Path, required=True)
    bc.add_argument("--log-file", type=Path, default=Path("/var/log/mosquitto/mosquitto.log"))
    bc.add_argument("--out", type=Path, required=True)
    bc.add_argument("--port", type=int, default=8883)
    bc.add_argument("--mtls-port", type=int, default=8884)
    bc.add_argument("--bind", default="0.0.0.0")
    bc.add_argument("--user", default="mosquitto", help="user the broker drops to as root")
    bc.set_defaults(func=_broker_config)
    en = sub.add_parser("enroll", help="make a device's broker password, certificate, signing key")
    en.add_argument("device")
    en.add_argument("--ca", type=Path, required=True)
    en.add_argument("--out", type=Path, required=True)
    en.add_argument("--aggregator-keys", type=Path, default=None, help="default: CA/keys")
    en.set_defaults(func=_enroll)
    rv = sub.add_parser("revoke", help="revoke a device: password, signing key, certificate")
    rv.add_argument("device")
    rv.add_argument("--ca", type=Path, required=True)
    rv.add_argument("--aggregator-keys", type=Path, default=None, help="default: CA/keys")
    rv.set_defaults(func=_revoke)
