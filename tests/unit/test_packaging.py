"""What a wheel carries: every package, and broker_config/ as package data."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from setuptools import find_packages

import fedge_cli.pki.ca as ca_module
from fedge_cli.pki import init_ca

ROOT = Path(__file__).resolve().parents[2]
ROLES = ["fedge", "edge_agent", "aggregator", "models", "simulation", "fedge_cli"]


def test_every_package_is_listed_for_the_wheel() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = setuptools["packages"]
    found = find_packages(ROOT, include=[p for r in ROLES for p in (r, f"{r}.*")])
    assert sorted({*found, "fedge.broker_config"}) == sorted(listed)


def test_failed_ca_init_leaves_no_half_made_ca(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*_args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ca_module, "give_aggregator_key", fail)
    with pytest.raises(OSError, match="disk full"):
        init_ca(tmp_path / "ca")
    assert not (tmp_path / "ca").exists()

    kept = tmp_path / "existing"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(OSError, match="disk full"):
        init_ca(kept)
    assert [p.name for p in kept.iterdir()] == ["notes.txt"]

    monkeypatch.undo()
    assert init_ca(tmp_path / "ca").ca_crt.is_file()  # the retry is not refused


def test_missing_acl_template_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ca_module, "ACL_TEMPLATE", tmp_path / "nowhere" / "acl")
    with pytest.raises(FileNotFoundError):
        init_ca(tmp_path / "ca")
    assert not (tmp_path / "ca").exists()
