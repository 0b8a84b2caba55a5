"""Mosquitto's password file: ``username:$7$ITER$b64(salt)$b64(PBKDF2-HMAC-SHA512)`` lines.

Entries are written by ``mosquitto_passwd`` where it is installed (the password fed on stdin,
so it never shows in a process list) or, where it is not, in its ``$7$`` format directly. The
file is mode 0640: the broker's group reads it, nobody else. Every rewrite keeps the file's
owner and group: Mosquitto re-reads it on SIGHUP as the ``mosquitto`` user, and a file that
went back to root:root 0640 locked every client out, the aggregator included.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import shutil
import subprocess
from pathlib import Path

from fedge.errors import ConfigError
from fedge_cli.pki.cadir import write_file

__all__ = [
    "PASSWD_MODE",
    "hash_password",
    "new_password",
    "remove_password",
    "set_password",
    "verify_password",
]

PASSWD_MODE = 0o640
_PW_ITERATIONS, _PW_SALT = 101, 12  # what mosquitto_passwd 2.0 writes


def new_password() -> str:
    """A random 32-character broker password."""
    return secrets.token_urlsafe(24)


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
        write_file(passwd, b"", PASSWD_MODE)
    tool = shutil.which("mosquitto_passwd")
    owner = os.stat(passwd)
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
        write_file(passwd, ("\n".join(keep) + "\n").encode(), PASSWD_MODE)
    # mosquitto_passwd may replace the file too: give it back its owner and group.
    if (os.stat(passwd).st_uid, os.stat(passwd).st_gid) != (owner.st_uid, owner.st_gid):
        os.chown(passwd, owner.st_uid, owner.st_gid)
    os.chmod(passwd, PASSWD_MODE)


def remove_password(passwd: Path, username: str) -> bool:
    """Delete ``username`` from the password file; False if it was not there."""
    lines = _passwd_lines(Path(passwd))
    keep = [ln for ln in lines if ln.split(":", 1)[0] != username]
    if len(keep) == len(lines):
        return False
    write_file(Path(passwd), ("\n".join(keep) + "\n" if keep else "").encode(), PASSWD_MODE)
    return True
