"""Atomic file replacement: a crash leaves either the old file or the new one, never half.

A rename puts a *new* inode in place, owned by whoever writes it with the temp file's mode.
For a file another process reads under its own identity (the broker's password file, read
by the ``mosquitto`` user after a SIGHUP) that silently revokes its access: ``keep_owner``
gives the new file the old one's owner and group, and ``mode`` its permissions, before the
rename, so there is no moment when the broker cannot read it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write"]


def atomic_write(
    path: Path, data: bytes, *, mode: int | None = None, keep_owner: bool = False
) -> None:
    """Write to a temp file in the same directory, fsync it, rename over ``path``, fsync dir.

    ``mode``: the new file's permission bits (else the temp file's 0600). ``keep_owner``: if
    ``path`` exists, the new file gets its owner and group (``PermissionError`` if this
    process may not give them, rather than a file its reader can no longer open).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = _owner(path) if keep_owner else None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if owner is not None and owner != (os.geteuid(), os.getegid()):
                os.fchown(f.fileno(), *owner)
            if mode is not None:
                os.fchmod(f.fileno(), mode)  # after fchown, which may clear setgid bits
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _owner(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_uid, st.st_gid
