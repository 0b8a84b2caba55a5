"""models.int8: static QDQ int8 models calibrated with given ranges, not a data reader."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from edge_agent.calibration import compute_ranges
from fedge.errors import InvalidValue
from models.int8 import MissingRanges, calibration_tensor_names, quantize_int8
from models.onnx_export import OnnxTemplate
from models.qat import activation_qparams, fake_quantize_weight
from models.torch_state import to_numpy_state
from models.zoo import build_model
from simulation.datasets import make_federated

# Activation tensor names of the exported mlp (TorchScript exporter naming).
RELU, RELU1 = "/Relu_output_0", "/Relu_1_output_0"
LIN, LIN1 = "/fc1/Gemm_output_0", "/fc2/Gemm_output_0"

Trained = tuple[bytes, dict[str, tuple[float, float]], np.ndarray, np.ndarray]


@pytest.fixture(scope="module")
def trained() -> Trained:
    """An mlp trained in float on digits, its fp32 ONNX and central ranges on its train set."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    data = make_federated("digits", 1, "iid", seed=0)
    (x, y), (x_test, y_test) = data.parts[0], data.test
    model = build_model("mlp", 64, 10, seed=0)
    try:
        _train(model, x, y)
    finally:
        torch.set_num_threads(previous)
    fp32 = OnnxTemplate("mlp", 64, 10).render(to_numpy_state(model))
    return fp32, compute_ranges(fp32, x), x_test, y_test


def _train(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        order = torch.randperm(len(yt), generator=gen)
        for start in range(0, len(yt), 32):
            idx = order[start : start + 32]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()


def _logits(model: bytes, x: np.ndarray, *, optimize: bool = True) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def _initializers(model: bytes) -> dict[str, np.ndarray]:
    graph = onnx.load_model_from_string(model).graph
    return {t.name: numpy_helper.to_array(t) for t in graph.initializer}


def test_calibration_tensor_names_of_the_mlp(trained: Trained) -> None:
    # Prepare: the exported mlp is input -> Gemm -> Relu -> Gemm -> Relu -> Gemm -> logits.
    fp32 = trained[0]

    # Execute
    names = calibration_tensor_names(fp32)

    # Assert
    assert names == tuple(sorted(("input", LIN, LIN1, "logits", RELU, RELU1)))


@pytest.mark.parametrize("activation_type", ["uint8", "int8"])
def test_int8_is_smaller_than_fp32_and_agrees_on_digits(
    trained: Trained, activation_type: str
) -> None:
    # Prepare
    fp32, ranges, x_test, y_test = trained

    # Execute
    int8 = quantize_int8(fp32, ranges, activation_type=activation_type)  # type: ignore[arg-type]

    # Assert
    assert len(int8) < 0.6 * len(fp32)
    fp32_pred = _logits(fp32, x_test).argmax(axis=1)
    int8_pred = _logits(int8, x_test).argmax(axis=1)
    assert (int8_pred == fp32_pred).mean() >= 0.97
    assert (int8_pred == y_test).mean() >= (fp32_pred == y_test).mean() - 0.01


def test_int8_model_is_deterministic_single_file_and_really_int8(trained: Trained) -> None:
    # Prepare
    fp32, ranges, _, _ = trained

    # Execute
    first = quantize_int8(fp32, ranges)
    second = quantize_int8(fp32, dict(reversed(list(ranges.items()))))

    # Assert
    assert first == second
    model = onnx.load_model_from_string(first)
    onnx.checker.check_model(model, full_check=True)
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer)
    inits = _initializers(first)
    for layer in ("fc1", "fc2", "fc3"):
        assert inits[f"{layer}.weight_quantized"].dtype == np.int8
        assert f"{layer}.weight" not in inits  # no fp32 copy of the weights is left
    assert {n.op_type for n in model.graph.node} >= {"QuantizeLinear", "DequantizeLinear", "Gemm"}


def test_int8_grid_is_the_grid_qat_trains_on(trained: Trained) -> None:
    # Prepare
    fp32, ranges, _, _ = trained
    weights = _initializers(fp32)

    # Execute
    inits = _initializers(quantize_int8(fp32, ranges))

    # Assert: activations (the Gemm output carries its Relu's range) ...
    for tensor in ("input", RELU, RELU1, "logits"):
        scale, zero_point = activation_qparams(*ranges[tensor])
        assert float(inits[f"{tensor}_scale"]) == pytest.approx(scale, rel=1e-6)
        assert int(inits[f"{tensor}_zero_point"]) == zero_point
    # ... and weights, per output channel, symmetric over [-64, 64] (7 bits, see models.int8).
    for layer in ("fc1", "fc2", "fc3"):
        w = weights[f"{layer}.weight"]
        expected = np.abs(w).max(axis=1) / 64
        np.testing.assert_allclose(inits[f"{layer}.weight_scale"], expected, rtol=1e-6)
        assert not inits[f"{layer}.weight_zero_point"].any()
        q = inits[f"{layer}.weight_quantized"]
        # Every row's largest |w| lands on the edge of its grid, and nothing beyond it.
        assert (np.abs(q.astype(np.int16)).max(axis=1) == 64).all()
        np.testing.assert_array_equal(
            q.astype(np.float32) * inits[f"{layer}.weight_scale"][:, None],
            fake_quantize_weight(torch.from_numpy(w.copy())).numpy(),
        )


@pytest.mark.parametrize("activation_type", ["uint8", "int8"])
def test_int8_kernels_compute_what_the_qdq_graph_says(
    trained: Trained, activation_type: str
) -> None:
    # Prepare: the same int8 model run twice, through onnxruntime's fused integer kernels and
    # with graph optimizations off (each QuantizeLinear/DequantizeLinear/Gemm evaluated as
    # written: the arithmetic models.qat trains on). On x86 CPUs without VNNI, 8-bit weights
    # made the u8 x s8 kernels saturate (int16 pair sums) and the logits differ by up to ~17
    # steps of their grid; 7-bit weights cannot overflow on any CPU.
    fp32, ranges, x_test, _ = trained
    int8 = quantize_int8(fp32, ranges, activation_type=activation_type)  # type: ignore[arg-type]
    x = np.concatenate([x_test, np.ones((4, 64), np.float32)])  # + all-max rows: worst case
    step = float(_initializers(int8)["logits_scale"])

    # Execute
    fused = _logits(int8, x)
    as_written = _logits(int8, x, optimize=False)

    # Assert: at most one step of the logits grid apart (rounding of the requantization).
    assert np.abs(fused - as_written).max() <= 1.01 * step


def test_a_missing_range_raises_missing_ranges(trained: Trained) -> None:
    # Prepare
    fp32, ranges, _, _ = trained
    partial = {k: v for k, v in ranges.items() if k != RELU1}

    # Execute / Assert
    with pytest.raises(MissingRanges, match=RELU1):
        quantize_int8(fp32, partial)
    with pytest.raises(MissingRanges):
        quantize_int8(fp32, {})


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("fc1.weight", (0.0, 1.0), "does not calibrate"),
        ("nope", (0.0, 1.0), "does not calibrate"),
        (RELU, (2.0, 1.0), "min <= max"),
        (RELU, (0.0, float("nan")), "finite"),
        (RELU, (0.0, 1e39), "finite"),  # finite in float64, inf in float32
        (RELU, (0.0,), "two numbers"),
    ],
)
def test_invalid_ranges_are_refused(
    trained: Trained, name: str, value: tuple[float, ...], message: str
) -> None:
    # Prepare
    fp32, ranges, _, _ = trained
    bad = {**ranges, name: value}

    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        quantize_int8(fp32, bad)


def test_only_fp32_models_are_quantized(trained: Trained) -> None:
    # Prepare
    fp32, ranges, _, _ = trained
    int8 = quantize_int8(fp32, ranges)

    # Execute / Assert
    with pytest.raises(ValueError, match="already quantized"):
        quantize_int8(int8, ranges)
    with pytest.raises(InvalidValue, match="not a serialized ONNX model"):
        quantize_int8(b"\x00garbage", ranges)
