"""The built wheel, installed in a fresh venv, runs `fedge ca init` and `fedge simulate`.

What this checks is the wheel: its modules, its package data (``fedge/broker_config/``) and its
entry point, with the checkout out of reach (no PYTHONPATH, another working directory). The
third-party dependencies (torch alone is 700 MB) are not installed again: a ``.pth`` line puts
the project venv's site-packages *after* the fresh venv's own. Python does not run the ``.pth``
files of a directory added that way, so the project's editable ``fedge`` stays inactive, and
the test asserts that ``fedge`` is imported from the fresh venv. About 25 s on 2 cores.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from simulation.broker import MosquittoNotFound, find_mosquitto

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
_COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", ".*_cache", "tests", "docs"
)


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float) -> str:
    p = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert p.returncode == 0, f"{cmd}: exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p.stdout


def test_built_wheel_runs_simulate_from_a_fresh_venv(tmp_path: Path) -> None:
    try:
        find_mosquitto()
    except MosquittoNotFound as exc:
        pytest.skip(str(exc))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    # Build from a copy: a build in the checkout leaves build/ and *.egg-info behind.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=_COPY_IGNORE)
    dist = tmp_path / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(dist), str(src)],
        tmp_path, env, 180,
    )  # fmt: skip
    (wheel,) = dist.glob("fedge-*.whl")

    fresh = tmp_path / "venv"
    venv.create(fresh, with_pip=False)
    py = fresh / "bin" / "python"
    site = Path(
        _run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
             tmp_path, env, 30).strip()
    )  # fmt: skip
    (site / "zz_project_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps",
         "--no-index", "-q", str(wheel)],
        tmp_path, env, 120,
    )  # fmt: skip

    work = tmp_path / "work"
    work.mkdir()
    where = _run([str(py), "-c", "import fedge; print(fedge.__file__)"], work, env, 30)
    assert where.startswith(str(fresh)), where
    fedge = str(fresh / "bin" / "fedge")
    assert _run([fedge, "--version"], work, env, 30).startswith("fedge 0.1.0")

    out = _run([fedge, "ca", "init", "--dir", "ca"], work, env, 60)
    assert "CA in ca" in out
    assert (work / "ca" / "broker" / "acl").is_file()

    out = _run(
        [fedge, "simulate", "--rounds", "2", "--devices", "3", "--epochs", "1",
         "--round-timeout", "30", "--out", "run"],
        work, env, 240,
    )  # fmt: skip
    assert "done: 2 rounds" in out, out
    assert (work / "run" / "summary.json").is_file()
