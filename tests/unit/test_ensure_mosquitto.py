"""scripts/ensure-mosquitto.sh (run by `make demo` and `make test`) checks the binary runs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from simulation.broker import MosquittoNotFound, find_mosquitto

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "ensure-mosquitto.sh"


def ensure(path_dirs: list[Path]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=os.pathsep.join([*map(str, path_dirs), os.environ["PATH"]]))
    return subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30, check=False
    )


def test_a_mosquitto_that_does_not_run_is_reported(tmp_path: Path) -> None:
    # Prepare: the first mosquitto on PATH fails as a binary with a missing library does
    fake = tmp_path / "mosquitto"
    fake.write_text("#!/bin/sh\necho 'error while loading shared libraries' >&2\nexit 127\n")
    fake.chmod(0o755)

    # Execute
    p = ensure([tmp_path])

    # Assert
    assert p.returncode == 1
    assert f"{fake} does not run" in p.stderr


def test_a_working_mosquitto_passes() -> None:
    try:
        find_mosquitto()
    except MosquittoNotFound as exc:
        pytest.skip(str(exc))
    p = ensure([])
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
