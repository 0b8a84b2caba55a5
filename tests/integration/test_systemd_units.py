"""The shipped systemd units (deploy/systemd/, docs/deploy-raspberry-pi.md): systemd accepts
them without a warning, they keep their restart and hardening policy, and every command they
start exists in our CLI with the flags they pass."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedge.support.runtime import USER_ERROR

pytestmark = pytest.mark.integration

UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
FILES = sorted(UNITS.glob("*.service"))
INSTANCE = "dev1"  # what %i becomes in a template unit


def _service(path: Path) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read(path)
    return parser["Service"]


def _exec_start(path: Path) -> list[str]:
    return shlex.split(_service(path)["ExecStart"].replace("%i", INSTANCE))


def test_both_units_are_shipped() -> None:
    assert [p.name for p in FILES] == ["fedge-agent@.service", "fedge-aggregator.service"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_systemd_analyze_verifies_the_unit(path: Path, tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd); parsed only")
    # verify also checks that ExecStart's program exists: point it at a stand-in, as the venv
    # of /opt/fedge is not on this machine.
    stub = tmp_path / "fedge"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    argv = _exec_start(path)
    name = path.name.replace("@.", f"@{INSTANCE}.")
    unit = tmp_path / name
    unit.write_text(path.read_text().replace(argv[0], str(stub)))
    p = subprocess.run(
        [tool, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    # systemd warns about unknown keys or bad values on stderr and still exits 0
    assert p.returncode == 0, p.stderr
    assert p.stderr.strip() == "", p.stderr


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_the_unit_restarts_on_failure_but_not_on_a_user_error(path: Path) -> None:
    svc = _service(path)
    assert svc["Restart"] == "on-failure"
    assert str(USER_ERROR) in svc["RestartPreventExitStatus"].split()
    assert svc["User"] == "fedge"
    assert svc["StateDirectory"].startswith("fedge/")
    assert svc["ProtectSystem"] == "strict"
    assert svc["NoNewPrivileges"] == "yes"
    assert svc["CapabilityBoundingSet"] == ""


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_exec_start_runs_a_command_of_our_cli_with_flags_it_has(path: Path) -> None:
    argv = _exec_start(path)
    assert Path(argv[0]).name == "fedge"
    words = [a for a in argv[1:] if not a.startswith("-")]
    flags = [a for a in argv[1:] if a.startswith("--")]
    sub = [w for w in words if w in ("agent", "aggregator")]
    assert sub, argv  # the role it starts
    p = subprocess.run(
        [sys.executable, "-m", "fedge_cli.main", *sub, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert p.returncode == 0, p.stderr
    for flag in flags:
        assert flag in p.stdout, (flag, p.stdout)
    # the state directory the unit makes is the one the config example in the guide names
    state = "/var/lib/" + _service(path)["StateDirectory"].replace("%i", INSTANCE)
    assert state in (UNITS.parents[1] / "docs" / "deploy-raspberry-pi.md").read_text()
