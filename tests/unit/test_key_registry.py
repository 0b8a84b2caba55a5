"""fedge.key_registry: the one owner of the on-disk key layout (devices/, revoked/)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from fedge.errors import ConfigError
from fedge.identity import SigningKey, load_verify_key
from fedge.key_registry import KeyFile, KeyRegistry


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_create_makes_both_directories_and_require_accepts_it(tmp_path: Path) -> None:
    # Execute
    reg = KeyRegistry(tmp_path / "keys").create()
    # Assert
    assert (tmp_path / "keys" / "devices").is_dir()
    assert (tmp_path / "keys" / "revoked").is_dir()
    assert reg.require() is reg
    assert (reg.enrolled(), reg.revoked()) == ([], [])


def test_require_names_the_commands_that_make_a_registry(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no devices/ in it.*fedge ca init.*fedge enroll"):
        KeyRegistry(tmp_path).require()


def test_add_writes_a_public_key_file_readable_by_all(tmp_path: Path) -> None:
    # Prepare
    reg = KeyRegistry(tmp_path).create()
    key = SigningKey.generate().verify_key
    # Execute
    path = reg.add("dev-0001", key)
    # Assert: the layout is pinned independently of the module's own path builders
    assert path == tmp_path / "devices" / "dev-0001.pub"
    assert _mode(path) == 0o644
    assert load_verify_key(path) == key
    assert reg.read_key("dev-0001") == key
    assert reg.is_enrolled("dev-0001")
    assert not reg.is_enrolled("dev-0002")
    assert reg.enrolled() == [KeyFile("dev-0001", path)]


def test_retire_moves_the_key_under_its_fingerprint(tmp_path: Path) -> None:
    # Prepare
    reg = KeyRegistry(tmp_path).create()
    key = SigningKey.generate().verify_key
    reg.add("dev-0001", key)
    before = reg.change_stamp()
    # Execute
    retired = reg.retire("dev-0001")
    again = reg.retire("dev-0001")
    # Assert
    expected = tmp_path / "revoked" / f"dev-0001-{key.fingerprint}.pub"
    assert (retired, again) == (expected, None)
    assert load_verify_key(expected) == key
    assert not (tmp_path / "devices" / "dev-0001.pub").exists()
    assert reg.enrolled() == []
    assert reg.revoked() == [KeyFile("dev-0001", expected)]  # the device keeps its dashes
    assert reg.change_stamp() != before


def test_listing_skips_other_files_and_sorts(tmp_path: Path) -> None:
    reg = KeyRegistry(tmp_path).create()
    for name in ("b", "a"):
        reg.add(name, SigningKey.generate().verify_key)
    (tmp_path / "devices" / "notes.txt").write_text("not a key")
    assert [f.device for f in reg.enrolled()] == ["a", "b"]


def test_missing_directories_list_as_empty(tmp_path: Path) -> None:
    reg = KeyRegistry(tmp_path / "nowhere")
    assert (reg.enrolled(), reg.revoked()) == ([], [])
    assert reg.change_stamp() == (0, 0, 0, 0)


@pytest.mark.parametrize("device", ["../x", "a/b", "", "+"])
def test_paths_refuse_names_that_are_not_device_ids(tmp_path: Path, device: str) -> None:
    reg = KeyRegistry(tmp_path).create()
    with pytest.raises(ValueError, match="invalid device id"):
        reg.device_key_path(device)
    with pytest.raises(ValueError, match="invalid device id"):
        reg.revoked_key_path(device, "00" * 8)
