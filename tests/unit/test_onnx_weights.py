"""models.onnx_weights on a hand-built ONNX model: no torch, expected values from numpy."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from fedge.errors import InvalidValue
from models.onnx_weights import onnx_sha256, read_initializers, replace_initializers

REPO_ROOT = Path(__file__).resolve().parents[2]
W = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
B = np.array([0.5, -1.0, 2.0], dtype=np.float32)
SHAPE = np.array([-1, 3], dtype=np.int64)


def _linear_model() -> onnx.ModelProto:
    """logits = reshape(input @ W.T + b, [-1, 3]), with an int64 shape constant."""
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["input", "W", "b"], ["z"], transB=1),
            helper.make_node("Reshape", ["z", "shape"], ["logits"]),
        ],
        "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [
            numpy_helper.from_array(W, "W"),
            numpy_helper.from_array(B, "b"),
            numpy_helper.from_array(SHAPE, "shape"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def model_bytes() -> bytes:
    return _linear_model().SerializeToString()


def _run(onnx_bytes: bytes, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def test_read_initializers_returns_float32_weights_only(model_bytes: bytes) -> None:
    # Execute
    weights = read_initializers(model_bytes)

    # Assert
    assert list(weights) == ["W", "b"]
    np.testing.assert_array_equal(weights["W"], W)
    np.testing.assert_array_equal(weights["b"], B)
    assert weights["W"].flags.writeable


def test_replace_initializers_changes_what_the_model_computes(model_bytes: bytes) -> None:
    # Prepare
    rng = np.random.default_rng(0)
    new_w = rng.normal(size=(3, 4)).astype(np.float32)
    new_b = rng.normal(size=3).astype(np.float32)
    x = rng.normal(size=(5, 4)).astype(np.float32)

    # Execute
    patched = replace_initializers(model_bytes, {"W": new_w, "b": new_b})

    # Assert
    np.testing.assert_allclose(_run(patched, x), x @ new_w.T + new_b, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(read_initializers(patched)["W"], new_w)


def test_replace_initializers_keeps_unnamed_initializers(model_bytes: bytes) -> None:
    # Prepare
    new_b = np.zeros(3, dtype=np.float32)
    x = np.ones((2, 4), dtype=np.float32)

    # Execute
    patched = replace_initializers(model_bytes, {"b": new_b})

    # Assert
    np.testing.assert_allclose(_run(patched, x), x @ W.T, rtol=1e-6)


def test_replace_initializers_is_deterministic(model_bytes: bytes) -> None:
    state: dict[str, np.ndarray] = {"W": W + 1, "b": B}

    assert replace_initializers(model_bytes, state) == replace_initializers(model_bytes, state)


def test_replace_initializers_rejects_a_missing_name(model_bytes: bytes) -> None:
    with pytest.raises(InvalidValue, match=r"no initializer\(s\) named \['fc9.weight'\]"):
        replace_initializers(model_bytes, {"fc9.weight": W})


def test_replace_initializers_rejects_a_wrong_shape(model_bytes: bytes) -> None:
    with pytest.raises(
        InvalidValue, match=r"shape mismatch for 'W': model has \(3, 4\), got \(4, 3\)"
    ):
        replace_initializers(model_bytes, {"W": W.T})


def test_replace_initializers_rejects_a_wrong_dtype(model_bytes: bytes) -> None:
    with pytest.raises(InvalidValue, match="dtype mismatch for 'W'"):
        replace_initializers(model_bytes, {"W": W.astype(np.float64)})


def test_models_with_external_data_are_refused(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "model.onnx"
    onnx.save_model(
        _linear_model(),
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    onnx_bytes = path.read_bytes()

    # Execute / Assert
    with pytest.raises(InvalidValue, match="external data"):
        read_initializers(onnx_bytes)
    with pytest.raises(InvalidValue, match="external data"):
        replace_initializers(onnx_bytes, {"b": B})


@pytest.mark.parametrize("garbage", [b"", b"\xff\xff\xff\xff", b"not an onnx model"])
def test_non_onnx_bytes_are_refused(garbage: bytes) -> None:
    with pytest.raises(InvalidValue, match="not a serialized ONNX model"):
        read_initializers(garbage)


def test_onnx_sha256_is_the_hex_digest() -> None:
    # Known answer for the empty string, then agreement with hashlib.
    empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert onnx_sha256(b"") == empty
    assert onnx_sha256(b"abc") == hashlib.sha256(b"abc").hexdigest()


def test_importing_onnx_weights_does_not_import_torch() -> None:
    code = "import sys, models.onnx_weights; assert 'torch' not in sys.modules, 'torch'"

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=False
    )

    assert result.returncode == 0, result.stderr
