"""`fedge simulate --dataset imu`: the cnn1d on one device per subject learns over a real broker."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulation.broker import MosquittoBroker
from simulation.fleet import SimConfig, simulate
from simulation.imu import NUM_CLASSES

pytestmark = pytest.mark.integration


def test_imu_fleet_learns_well_above_chance(broker: MosquittoBroker, tmp_path: Path) -> None:
    cfg = SimConfig(
        out=tmp_path / "run", dataset="imu", devices=5, rounds=3, epochs=1, lr=0.05,
        codec="fp32", broker=broker.url,
    )  # fmt: skip

    summary = simulate(cfg, say=lambda _s: None)

    assert summary["rounds"] == 3
    assert summary["final_accuracy"] > 2.0 / NUM_CLASSES
