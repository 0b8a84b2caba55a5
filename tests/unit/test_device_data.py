"""Device data: one file per device from a split directory, widths checked up front."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from aggregator.evaluation import EvalSet
from edge_agent.data import LocalData, load_local_data
from fedge.errors import ConfigError
from simulation.datasets import make_federated, write_npz_partitions


@pytest.fixture(scope="module")
def digits10() -> object:
    return make_federated("digits", 10, "iid", seed=0)


def file_of(data: LocalData, split: Path) -> str:
    """Which device-*.npz holds exactly these samples."""
    for f in sorted(split.glob("device-*.npz")):
        with np.load(f) as z:
            if np.array_equal(z["x"], data.x):
                return f.name
    raise AssertionError("no file holds these samples")


def test_split_maps_device_ids_to_files(tmp_path: Path, digits10: object) -> None:
    ids = [f"dev{i}" for i in range(1, 11)]
    write_npz_partitions(digits10, tmp_path, ids)  # type: ignore[arg-type]

    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["devices"] == {d: f"device-{i:03d}.npz" for i, d in enumerate(ids)}
    assert [file_of(load_local_data(tmp_path, d), tmp_path) for d in ids] == [
        f"device-{i:03d}.npz" for i in range(10)
    ]
    with pytest.raises(ConfigError, match=r"device dev11 is not in .*meta\.json"):
        load_local_data(tmp_path, "dev11")


def test_devices_claim_distinct_files_without_a_mapping(
    tmp_path: Path, digits10: object, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: with the old hash of the id, dev1..dev10 shared 7 files of 10
    write_npz_partitions(digits10, tmp_path)  # type: ignore[arg-type]
    ids = [f"dev{i}" for i in range(1, 11)]
    hashed = {int.from_bytes(hashlib.sha256(d.encode()).digest()[:8], "big") % 10 for d in ids}
    assert len(hashed) < 10

    # Execute
    caplog.set_level("INFO", logger="edge_agent.data")
    files = [file_of(load_local_data(tmp_path, d), tmp_path) for d in ids]
    again = file_of(load_local_data(tmp_path, "dev7"), tmp_path)  # a restart

    # Assert
    assert sorted(files) == [f"device-{i:03d}.npz" for i in range(10)]
    assert again == files[6]
    assert f"dev7: data {tmp_path / files[6]} (claimed" in caplog.text
    with pytest.raises(ConfigError, match=r"all 10 device-\*\.npz files .* are claimed"):
        load_local_data(tmp_path, "dev11")


def test_split_into_an_earlier_split_leaves_no_stale_files(
    tmp_path: Path, digits10: object
) -> None:
    write_npz_partitions(digits10, tmp_path)  # type: ignore[arg-type]
    load_local_data(tmp_path, "dev1")  # a claim

    write_npz_partitions(make_federated("digits", 4, "iid", seed=0), tmp_path)

    assert sorted(p.name for p in tmp_path.glob("device-*.npz")) == [
        f"device-{i:03d}.npz" for i in range(4)
    ]
    assert not (tmp_path / "claims").exists()
    assert len(json.loads((tmp_path / "meta.json").read_text())["sizes"]) == 4


def test_width_mismatch_is_one_line() -> None:
    data = LocalData(np.zeros((3, 784)), np.zeros(3))
    assert data.width_problem(784) is None
    assert data.width_problem(64) == "data has 784 features, the model expects 64"


def test_eval_data_of_the_wrong_width_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "test.npz"
    np.savez(path, x=np.zeros((5, 784), np.float32), y=np.zeros(5, np.int64))
    assert EvalSet.from_npz(path, 784).x.shape == (5, 784)
    with pytest.raises(ConfigError, match="has 784 features, the model expects 64"):
        EvalSet.from_npz(path, 64)
