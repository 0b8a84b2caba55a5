"""The operator's path to a rollout (fedge_cli/rollout.py, aggregator/rollout_requests.py),
the stage decision (aggregator/rollout_state.decide) and serving on a device
(fedge agent predict --state-dir)."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.rollout_requests import handle_requests, submit, wait_result
from aggregator.rollout_state import decide
from edge_agent.serving_store import ServingStore
from fedge.envelopes import ShadowReport
from fedge.errors import ConfigError
from fedge_cli.main import main
from fedge_cli.rollout import parse_stages


def test_stages_must_rise_to_one() -> None:
    assert parse_stages("0.05,0.25,1") == (0.05, 0.25, 1.0)
    for bad in ("0.5,0.25,1", "0.05,0.5", "0,1", "a,1", "0.5,0.5,1"):
        with pytest.raises(ConfigError):
            parse_stages(bad)


def test_a_request_is_answered_by_whoever_handles_the_state_dir(tmp_path: Path) -> None:
    seen: list[tuple[str, dict[str, Any]]] = []

    def run(cmd: str, args: dict[str, Any]) -> str:
        seen.append((cmd, args))
        if cmd == "abort":
            raise ConfigError("no rollout is running")
        return "ok"

    stop = threading.Event()

    def aggregator() -> None:
        while not stop.is_set():
            handle_requests(tmp_path, run)
            stop.wait(0.05)

    t = threading.Thread(target=aggregator)
    t.start()
    try:
        rid = submit(tmp_path, "start", {"version": 3})
        assert wait_result(tmp_path, rid, 5) == {"ok": True, "message": "ok"}
        rid = submit(tmp_path, "abort", {})
        assert wait_result(tmp_path, rid, 5) == {"ok": False, "message": "no rollout is running"}
    finally:
        stop.set()
        t.join()
    assert seen == [("start", {"version": 3}), ("abort", {})]
    assert not list((tmp_path / "rollout-requests").iterdir())  # nothing left behind


def test_a_request_nobody_takes_is_withdrawn(tmp_path: Path) -> None:
    rid = submit(tmp_path, "promote", {})
    with pytest.raises(ConfigError, match="is it running"):
        wait_result(tmp_path, rid, 0.3)
    assert not list((tmp_path / "rollout-requests").iterdir())


def test_status_reads_the_state_dir_without_an_aggregator(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "models").mkdir()  # an aggregator's state_dir, never started a rollout
    main(["rollout", "--state-dir", str(tmp_path), "status"])
    out = json.loads(capsys.readouterr().out)
    assert (out["outcome"], out["serving"], out["active"]) == (None, None, None)


@pytest.mark.parametrize("cmd", [["status"], ["start", "4"], ["promote"]])
def test_a_directory_that_is_no_state_dir_is_one_line_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cmd: list[str]
) -> None:
    # A mistyped --state-dir printed an empty status (exit 0), or waited out --timeout for an
    # aggregator that could never answer, leaving the directory behind.
    wrong = tmp_path / "aggstate-typo"
    with pytest.raises(SystemExit) as e:
        main(["rollout", "--state-dir", str(wrong), *cmd])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"fedge: error: {wrong} is not an aggregator's state_dir (no models/ in it): "
        "give the state_dir of its config, or --config AGGREGATOR.yaml"
    ]
    assert not wrong.exists()


def _report(acc: float, base: float, n: int = 100, error: str = "") -> ShadowReport:
    return ShadowReport(1, 2, n, acc, 0.1, 0.01, 1, base, 0.1, 0.01, error=error)


def test_stage_waits_then_pools_accuracy_over_its_cohort() -> None:
    cohort = {"a", "b", "c"}
    kw: dict[str, Any] = {"min_devices": 2, "max_regression": 1.0}
    assert decide({"a": _report(0.9, 0.9)}, cohort, cohort, **kw).action == "wait"
    # One device 3 points down on 100 samples, one 1 point up on 300: pooled 0 points.
    two = {"a": _report(0.87, 0.90), "b": _report(0.91, 0.90, n=300)}
    d = decide(two, cohort, cohort, **kw)
    assert d.action == "advance"
    assert d.regression_pp == pytest.approx(0.0, abs=1e-9)
    bad = {"a": _report(0.80, 0.90), "b": _report(0.85, 0.90)}
    assert decide(bad, cohort, cohort, **kw).action == "rollback"
    # A load failure rolls back at once, before the stage has its reports.
    assert decide({"c": _report(0, 0.9, 0, "load: x")}, cohort, cohort, **kw).action == "rollback"
    # Reports from outside the cohort do not count; a stage with no new member goes on.
    assert decide({"z": _report(0.1, 0.9)}, cohort, set(), **kw).action == "advance"


def test_predict_serves_the_released_version_not_the_training_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from models.onnx_export import OnnxTemplate
    from models.torch_state import to_numpy_state
    from models.zoo import build_model

    onnx = OnnxTemplate("mlp", 64, 10).render(to_numpy_state(build_model("mlp", 64, 10, seed=3)))
    np.save(tmp_path / "x.npy", np.zeros((2, 64), np.float32))
    argv = ["agent", "predict", "--state-dir", str(tmp_path), "--input", str(tmp_path / "x.npy")]
    with pytest.raises(SystemExit):  # nothing released yet: one line, exit 2
        main([*argv, "--json"])
    assert "no serving version" in capsys.readouterr().err
    ServingStore(tmp_path).switch(4, hashlib.sha256(onnx).hexdigest(), onnx, seq=1)
    main([*argv, "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["serving"] == 4
    assert len(out["classes"]) == 2
