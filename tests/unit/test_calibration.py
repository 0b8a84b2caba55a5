"""Federated calibration: device ranges (edge_agent.calibration), merge and int8 build
(aggregator.calibration)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator

from aggregator.calibration import (
    RangeMerger,
    build_int8,
    merge_ranges,
    validate_ranges,
)
from edge_agent.calibration import compute_ranges
from fedge.errors import ProtocolError
from models.int8 import calibration_tensor_names, quantize_int8
from models.onnx_export import OnnxTemplate
from models.torch_state import to_numpy_state
from models.zoo import build_model
from simulation.datasets import make_federated

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fp32() -> bytes:
    return OnnxTemplate("mlp", 64, 10).render(to_numpy_state(build_model("mlp", 64, 10, seed=4)))


@pytest.fixture(scope="module")
def devices() -> tuple[np.ndarray, np.ndarray]:
    """Two devices with skewed labels (their ranges differ), 240 samples: under the cap."""
    data = make_federated("digits", 2, "dirichlet:0.3", seed=1)
    return data.parts[0][0][:120], data.parts[1][0][:120]


class _Reader(CalibrationDataReader):
    def __init__(self, x: np.ndarray, batch: int) -> None:
        self._batches = iter([{"input": x[i : i + batch]} for i in range(0, len(x), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def test_ranges_equal_onnxruntime_minmax_calibrator(
    fp32: bytes, devices: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    # Prepare: onnxruntime's own calibrator on the same samples is the reference.
    x = devices[0]
    model_path = tmp_path / "model.onnx"
    model_path.write_bytes(fp32)
    calibrator = create_calibrator(
        model_path,
        op_types_to_calibrate=None,
        augmented_model_path=str(tmp_path / "augmented.onnx"),
        calibrate_method=CalibrationMethod.MinMax,
    )
    calibrator.collect_data(_Reader(x, batch=50))
    reference = {
        name: tuple(np.asarray(data.range_value, dtype=np.float64).ravel())
        for name, data in calibrator.compute_data().items()
    }

    # Execute
    ranges = compute_ranges(fp32, x)

    # Assert
    assert set(ranges) == set(calibration_tensor_names(fp32))
    assert set(ranges) <= set(reference)
    for name, (low, high) in ranges.items():
        assert (low, high) == pytest.approx(reference[name], rel=1e-6, abs=1e-7), name


def test_merged_device_ranges_equal_the_ranges_of_the_union(
    fp32: bytes, devices: tuple[np.ndarray, np.ndarray]
) -> None:
    # Prepare
    x_a, x_b = devices
    reports = [compute_ranges(fp32, x_a), compute_ranges(fp32, x_b)]
    merger = RangeMerger(calibration_tensor_names(fp32))

    # Execute
    for report in reports:
        merger.add({name: list(pair) for name, pair in report.items()})  # as msgpack decodes
    merged = merger.merged()

    # Assert
    union = compute_ranges(fp32, np.concatenate([x_a, x_b]))
    assert merged == union
    assert merge_ranges(reports) == union
    assert merged != reports[0]  # the two devices did see different ranges
    assert quantize_int8(fp32, merged) == quantize_int8(fp32, union)


def test_a_duplicate_report_changes_nothing(
    fp32: bytes, devices: tuple[np.ndarray, np.ndarray]
) -> None:
    # Prepare
    report = compute_ranges(fp32, devices[0])
    merger = RangeMerger(report)
    merger.add(report)
    once = merger.merged()

    # Execute
    merger.add(report)

    # Assert
    assert merger.merged() == once
    assert merger.reports == 2


def test_calibration_uses_at_most_max_samples(fp32: bytes) -> None:
    # Prepare: row i holds the value i / 1000 everywhere, so the input range names the rows used.
    x = np.repeat((np.arange(300, dtype=np.float32) / 1000)[:, None], 64, axis=1)

    # Execute
    one = compute_ranges(fp32, x, max_samples=1)
    some = compute_ranges(fp32, x, max_samples=10)
    every = compute_ranges(fp32, x, max_samples=300)

    # Assert
    assert one["input"][0] == one["input"][1]
    assert some["input"][0] < some["input"][1]
    assert some["input"] != every["input"]
    assert every["input"] == (0.0, pytest.approx(0.299))


def test_calibrating_does_not_import_torch() -> None:
    code = "import sys, edge_agent.calibration; print('torch' in sys.modules)"

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=False
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (np.full((3, 64), np.nan, dtype=np.float32), "non-finite"),
        (np.zeros((0, 64), dtype=np.float32), "non-empty"),
        (np.zeros(64, dtype=np.float32), "2-D"),
        (np.zeros((3, 64), dtype=np.int64), "floats"),
    ],
)
def test_bad_local_data_is_refused(fp32: bytes, x: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compute_ranges(fp32, x)


def test_a_diverged_model_does_not_report_ranges() -> None:
    # Prepare
    state = to_numpy_state(build_model("mlp", 64, 10))
    state["fc2.bias"][:] = np.inf
    diverged = OnnxTemplate("mlp", 64, 10).render(state)

    # Execute / Assert
    with pytest.raises(ValueError, match="non-finite"):
        compute_ranges(diverged, np.ones((4, 64), dtype=np.float32))


ALLOWED = ("input", "relu", "logits")


@pytest.mark.parametrize(
    ("report", "message"),
    [
        ([("relu", [0.0, 1.0])], "must be a map"),
        ({}, "empty"),
        ({"fc1.weight": [0.0, 1.0]}, "no calibrated activation"),
        ({7: [0.0, 1.0]}, "short string"),
        ({"x" * 300: [0.0, 1.0]}, "short string"),
        ({"relu": [1.0, 0.0]}, "min 1.0 > max 0.0"),
        ({"relu": [0.0, float("nan")]}, "not finite"),
        ({"relu": [float("-inf"), 1.0]}, "not finite"),
        ({"relu": [0.0, 1e39]}, "not finite in float32"),
        ({"relu": [0.0, 1.0, 2.0]}, r"\[min, max\]"),
        ({"relu": "0,1"}, r"\[min, max\]"),
        ({"relu": [True, 1.0]}, "two numbers"),
        ({"relu": [b"\x00", 1.0]}, "two numbers"),
    ],
)
def test_bad_reports_are_rejected_with_a_reason(report: object, message: str) -> None:
    # Prepare
    merger = RangeMerger(ALLOWED)
    merger.add({"relu": [0.0, 2.0]})

    # Execute
    with pytest.raises(ProtocolError, match=message) as caught:
        merger.add(report)

    # Assert: rejected whole, nothing of it merged.
    assert caught.value.reason == "bad_calibration"
    assert merger.merged() == {"relu": (0.0, 2.0)}
    assert merger.reports == 1


def test_a_report_with_too_many_tensors_is_rejected() -> None:
    names = [f"t{i}" for i in range(5)]
    with pytest.raises(ProtocolError, match="5 ranges > limit 4"):
        validate_ranges(dict.fromkeys(names, (0.0, 1.0)), names, max_tensors=4)


@pytest.mark.parametrize("ranges", [None, {}])
def test_without_reports_the_version_is_published_in_fp32_only(
    fp32: bytes, ranges: dict[str, tuple[float, float]] | None, caplog: pytest.LogCaptureFixture
) -> None:
    # Execute
    with caplog.at_level(logging.WARNING, logger="aggregator.calibration"):
        build = build_int8(fp32, ranges)

    # Assert
    assert build.onnx is None
    assert build.skipped == "no device reported calibration ranges"
    assert "publishing fp32 only" in caplog.text


def test_incomplete_ranges_skip_int8_and_complete_ones_build_it(
    fp32: bytes, devices: tuple[np.ndarray, np.ndarray]
) -> None:
    # Prepare
    ranges = compute_ranges(fp32, devices[0])
    partial = {k: v for k, v in ranges.items() if k != "logits"}

    # Execute
    skipped = build_int8(fp32, partial)
    built = build_int8(fp32, ranges)

    # Assert
    assert skipped.onnx is None
    assert skipped.skipped is not None
    assert "logits" in skipped.skipped
    assert built.onnx == quantize_int8(fp32, ranges)
    assert built.skipped is None
    assert built.tensors == len(ranges)


# --- robust merge: one device cannot set the fleet's grid (issue 17, item 7) ----------------


def test_one_hostile_report_among_three_is_trimmed() -> None:
    honest = [{"a": (-1.0, 2.0)}, {"a": (-0.5, 3.0)}]
    hostile = {"a": (-1e30, 1e30)}

    merged = merge_ranges([honest[0], hostile, honest[1]])

    assert merged == {"a": (-1.0, 3.0)}  # exactly the honest union


def test_a_range_moves_at_most_one_previous_width_per_version() -> None:
    previous = {"a": (0.0, 10.0), "b": (-1.0, 1.0)}
    reports = [{"a": (0.0, 1e6), "b": (-0.5, 0.5)}, {"a": (-3.0, 12.0), "b": (-0.4, 0.6)}]

    merged = merge_ranges(reports, previous)  # two devices: nothing to trim

    assert merged == {"a": (-3.0, 20.0), "b": (-0.5, 0.6)}  # narrowing is not bounded


def test_the_merger_bounds_by_the_previous_ranges() -> None:
    merger = RangeMerger(["a"], previous={"a": (0.0, 4.0)})
    merger.add({"a": [-100.0, 100.0]})

    assert merger.merged() == {"a": (-4.0, 8.0)}
    assert merger.reports == 1
