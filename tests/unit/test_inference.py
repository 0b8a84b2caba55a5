"""edge_agent.inference: torch-free prediction from exported models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edge_agent.inference import OnnxPredictor, load_input
from models.onnx_export import export_onnx
from models.zoo import build_model

REPO_ROOT = Path(__file__).resolve().parents[2]
INPUT_DIM = 6
NUM_CLASSES = 4


@pytest.fixture(scope="module")
def mlp_and_bytes() -> tuple[torch.nn.Module, bytes]:
    module = build_model("mlp", INPUT_DIM, NUM_CLASSES, seed=2).eval()
    return module, export_onnx(module, INPUT_DIM)


def _samples(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, INPUT_DIM)).astype(np.float32)


def test_importing_inference_does_not_import_torch() -> None:
    code = "import sys, edge_agent.inference; print('torch' in sys.modules)"

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=False
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("batch", [1, 7])
def test_predict_matches_torch(mlp_and_bytes: tuple[torch.nn.Module, bytes], batch: int) -> None:
    # Prepare
    module, onnx_bytes = mlp_and_bytes
    x = _samples(batch, seed=batch)
    with torch.no_grad():
        expected_logits = module(torch.from_numpy(x)).numpy()
    predictor = OnnxPredictor(onnx_bytes)

    # Execute
    logits = predictor.predict_logits(x)
    classes = predictor.predict(x)

    # Assert
    np.testing.assert_allclose(logits, expected_logits, rtol=0, atol=1e-5)
    assert classes.dtype == np.int64
    np.testing.assert_array_equal(classes, expected_logits.argmax(axis=1))
    assert predictor.input_dim == INPUT_DIM


def test_predict_casts_float64_input(mlp_and_bytes: tuple[torch.nn.Module, bytes]) -> None:
    predictor = OnnxPredictor(mlp_and_bytes[1])
    x = _samples(3)

    np.testing.assert_array_equal(
        predictor.predict_logits(x.astype(np.float64)), predictor.predict_logits(x)
    )


def test_from_path_loads_the_same_model(
    mlp_and_bytes: tuple[torch.nn.Module, bytes], tmp_path: Path
) -> None:
    # Prepare
    path = tmp_path / "global.onnx"
    path.write_bytes(mlp_and_bytes[1])
    x = _samples(4)

    # Execute
    predictor = OnnxPredictor.from_path(path)

    # Assert
    np.testing.assert_array_equal(
        predictor.predict_logits(x), OnnxPredictor(mlp_and_bytes[1]).predict_logits(x)
    )


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (np.zeros(INPUT_DIM, dtype=np.float32), "expected a 2-D array"),
        (np.zeros((2, INPUT_DIM + 1), dtype=np.float32), "expects 6 features per sample, got 7"),
        (np.zeros((2, INPUT_DIM), dtype=np.int64), "expected a float array"),
    ],
)
def test_predict_rejects_malformed_input(
    mlp_and_bytes: tuple[torch.nn.Module, bytes], x: np.ndarray, message: str
) -> None:
    predictor = OnnxPredictor(mlp_and_bytes[1])

    with pytest.raises(ValueError, match=message):
        predictor.predict(x)


def test_invalid_model_bytes_raise_value_error() -> None:
    with pytest.raises(ValueError, match="cannot load ONNX model"):
        OnnxPredictor(b"definitely not onnx")


def test_model_with_external_data_is_refused_even_next_to_its_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: onnxruntime resolves external data of a model loaded from bytes
    # against the working directory, so put the data file right there.
    weight = numpy_helper.from_array(np.ones((INPUT_DIM, 2), dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "W"], ["logits"])],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", INPUT_DIM])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "model.onnx"
    onnx.save_model(model, path, save_as_external_data=True, location="w.bin", size_threshold=0)
    monkeypatch.chdir(tmp_path)

    # Execute / Assert
    with pytest.raises(ValueError, match="cannot load ONNX model"):
        OnnxPredictor.from_path(path)


def test_load_input_reads_npy_npz_and_csv(tmp_path: Path) -> None:
    # Prepare
    x = np.array([[1.5, -2.0, 3.0], [0.25, 0.0, 1e3]], dtype=np.float64)
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "x.npz", x=x, y=np.array([0, 1]))
    (tmp_path / "x.csv").write_text("1.5,-2.0,3.0\n0.25,0,1000\n")

    # Execute
    loaded = [load_input(tmp_path / name) for name in ("x.npy", "x.npz", "x.csv")]

    # Assert
    for array in loaded:
        assert array.dtype == np.float32
        np.testing.assert_array_equal(array, x.astype(np.float32))


def test_load_input_reads_a_single_csv_row_as_one_sample(tmp_path: Path) -> None:
    (tmp_path / "one.csv").write_text("1,2,3\n")

    assert load_input(tmp_path / "one.csv").shape == (1, 3)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("x.txt", "1,2\n", "unsupported input format '.txt'"),
        ("x.csv", "", "non-empty 2-D"),
        ("x.csv", "1,a\n", "not comma-separated floats"),
    ],
)
def test_load_input_rejects_bad_files(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    (tmp_path / name).write_text(content)

    with pytest.raises(ValueError, match=message):
        load_input(tmp_path / name)


def test_load_input_requires_key_x_in_npz(tmp_path: Path) -> None:
    np.savez(tmp_path / "data.npz", features=np.zeros((2, 2)))

    with pytest.raises(ValueError, match=r"no array named 'x' \(has \['features'\]\)"):
        load_input(tmp_path / "data.npz")


def test_load_input_rejects_1d_npy(tmp_path: Path) -> None:
    np.save(tmp_path / "flat.npy", np.zeros(3))

    with pytest.raises(ValueError, match=r"got shape \(3,\)"):
        load_input(tmp_path / "flat.npy")


def test_csv_with_a_header_row_is_read(tmp_path: Path) -> None:
    # Prepare: column names, as a spreadsheet writes them, after a blank line
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 16
    path = tmp_path / "samples.csv"
    rows = "\n".join(",".join(repr(float(v)) for v in row) for row in x)
    path.write_text("\npx0,px1,px2,px3\n" + rows + "\n")

    # Execute
    got = load_input(path)

    # Assert
    np.testing.assert_array_equal(got, x)


def test_csv_with_words_below_the_first_row_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "samples.csv"
    path.write_text("a,b\n1,2\nthree,4\n")
    with pytest.raises(ValueError, match="not comma-separated floats"):
        load_input(path)
