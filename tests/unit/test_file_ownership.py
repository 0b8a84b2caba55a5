"""Rewrites keep the owner, group and mode a file's reader relies on (issue: a revoke that
rewrote the broker's password file as root:root 0640 locked every client out)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from cryptography import x509

from fedge.support.fsutil import atomic_write
from fedge_cli import pki
from fedge_cli.pki import passwords

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a file away needs root")
OTHER = (65534, 65534)  # nobody:nogroup, an owner this test is not


def _meta(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_uid, st.st_gid, st.st_mode & 0o7777


@needs_root
def test_atomic_write_keeps_owner_and_sets_mode_before_the_rename(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    path.write_bytes(b"old\n")
    os.chown(path, *OTHER)
    os.chmod(path, 0o640)

    atomic_write(path, b"new\n", mode=0o640, keep_owner=True)

    assert path.read_bytes() == b"new\n"
    assert _meta(path) == (*OTHER, 0o640)


def test_atomic_write_without_keep_owner_writes_a_file_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "state"
    atomic_write(path, b"x", mode=0o600)
    atomic_write(path, b"y")

    assert path.read_bytes() == b"y"
    assert _meta(path)[:2] == (os.geteuid(), os.getegid())


@needs_root
@pytest.mark.parametrize("tool", [True, False], ids=["mosquitto_passwd", "own-format"])
def test_password_changes_keep_the_files_owner_group_and_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tool: bool
) -> None:
    if tool and shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd not installed")
    if not tool:
        monkeypatch.setattr(passwords.shutil, "which", lambda _name: None)
    passwd = tmp_path / "passwd"
    passwords.set_password(passwd, "dev1", "pw1")
    passwords.set_password(passwd, "dev2", "pw2")
    os.chown(passwd, *OTHER)  # as an operator does: chgrp mosquitto passwd

    passwords.set_password(passwd, "dev3", "pw3")
    after_set = _meta(passwd)
    assert passwords.remove_password(passwd, "dev2")

    assert after_set == (*OTHER, 0o640)
    assert _meta(passwd) == (*OTHER, 0o640)
    users = [ln.split(":", 1)[0] for ln in passwd.read_text().splitlines()]
    assert users == ["dev1", "dev3"]


def test_crl_numbers_increase_even_within_one_second(tmp_path: Path) -> None:
    ca = pki.init_ca(tmp_path / "ca")

    numbers = []
    for _ in range(3):
        pki.write_crl(ca.root)
        crl = x509.load_pem_x509_crl(ca.crl.read_bytes())
        numbers.append(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)

    assert numbers == sorted(set(numbers))
    assert len(numbers) == 3


def test_identity_json_is_written_whole_and_world_readable(tmp_path: Path) -> None:
    ca = pki.init_ca(tmp_path / "ca")
    out = pki.enroll(ca.root, "dev1", tmp_path / "dev1")

    assert (out / "identity.json").stat().st_mode & 0o777 == 0o644
    assert '"identity": "dev1"' in (out / "identity.json").read_text()
