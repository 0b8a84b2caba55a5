"""A structurally pruned version is released like any other (issue 18 with the rollouts of
issue 14), over a real Mosquitto: the release carries the smaller ``vNNNNNN.serving.onnx``,
devices shadow-evaluate it, serve it, and ``fedge agent predict`` answers with it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.prune_config import PruningConfig
from aggregator.rollout_requests import submit, wait_result
from edge_agent.data import LocalData
from edge_agent.inference import OnnxPredictor
from edge_agent.serving_store import load_serving
from models.onnx_weights import read_initializers
from simulation.datasets import make_federated
from tests.integration.fleet_helpers import wait_until

pytestmark = pytest.mark.integration

DEVICES = 3


def test_a_pruned_version_is_released_shadow_evaluated_served_and_predicted_with(
    fleet_factory: Any, tmp_path: Path
) -> None:
    data = make_federated("digits", DEVICES, "iid", seed=0)
    prune = PruningConfig(kind="structured", target=0.5, start_round=1, end_round=2)
    fleet = fleet_factory(
        data, rounds=2, target_devices=DEVICES, min_devices=DEVICES, round_timeout=30,
        pruning=prune,
    )  # fmt: skip
    fleet.start_aggregator()
    x, y = data.test
    share = len(y) // DEVICES
    for i in range(DEVICES):  # each device's hold-out: its slice of the test split
        part = slice(i * share, (i + 1) * share)
        fleet.add_agent(i, holdout=LocalData(x[part], y[part]))
    agg = fleet.aggregator
    wait_until(agg.done.is_set, 60, "two versions")

    trained, meta = agg.registry.load(2)
    serving_path = agg.registry.path(2).with_suffix(".serving.onnx")
    serving = serving_path.read_bytes()
    assert len(serving) < 0.6 * len(trained)  # units removed from the file
    assert read_initializers(serving)["fc1.weight"].shape[0] < 64

    state = fleet.config.state_dir

    def command(cmd: str, **args: Any) -> str:
        answer = wait_result(state, submit(state, cmd, args), 10)
        assert answer["ok"], answer
        return str(answer["message"])

    command("start", version=1, stages=[1.0])  # something served to compare against
    wait_until(lambda: agg.rollout.state.outcome == "promoted", 30, "v1 promoted")
    command("start", version=2, stages=[1.0], max_regression=5.0, min_devices=DEVICES)
    wait_until(lambda: agg.rollout.state.outcome == "promoted", 30, "v2 promoted")
    devs = [f"dev-{i}" for i in range(DEVICES)]
    wait_until(
        lambda: all(fleet.agents[d].release.serving == 2 for d in devs), 30, "devices serve v2"
    )

    # The release named the serving model's sha256, and every device shadow-evaluated it.
    assert agg.rollout.state.good == (2, agg.registry.meta(2)["serving_sha256"])
    for d in devs:
        report = fleet.agents[d].release.report
        assert report is not None
        assert (report.version, report.baseline, report.samples) == (2, 1, share)
        assert not report.error
        version, onnx = load_serving(fleet.tmp / d)
        assert (version, onnx) == (2, serving)

    # `fedge agent predict --state-dir` answers with the pruned model the device serves.
    inp = tmp_path / "x.npy"
    np.save(inp, x[:20])
    p = subprocess.run(
        [sys.executable, "-m", "fedge_cli.main", "agent", "predict", "--state-dir",
         str(fleet.tmp / "dev-0"), "--input", str(inp), "--json"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["serving"] == 2
    want = OnnxPredictor(serving).predict_logits(x[:20])
    np.testing.assert_allclose(np.asarray(out["logits"]), want, rtol=1e-5, atol=1e-5)
    # ... and it is the trained (masked dense) model's function, to float tolerance.
    dense = OnnxPredictor(trained).predict_logits(x[:20])
    np.testing.assert_allclose(want, dense, rtol=1e-4, atol=1e-4)
    assert meta["sha256"] != agg.registry.meta(2)["serving_sha256"]
