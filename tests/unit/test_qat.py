"""models.qat: fake quantization with a straight-through estimator, and QAT local training."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from aggregator.evaluation import EvalSet, evaluate_onnx
from edge_agent.calibration import compute_ranges
from edge_agent.trainer import train_local
from fedge.envelopes import ModelArch, TrainHyper
from models.int8 import quantize_int8
from models.onnx_export import OnnxTemplate
from models.qat import (
    activation_qparams,
    disable_qat,
    enable_qat,
    fake_quantize_activation,
    fake_quantize_weight,
    is_qat_enabled,
)
from models.torch_state import to_numpy_state
from models.zoo import build_model
from simulation.datasets import make_federated


def _np_fake_quant_act(x: np.ndarray, low: float, high: float) -> np.ndarray:
    """Reference uint8 affine quantize-dequantize, written from the ONNX QuantizeLinear spec."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / 255.0
    zero_point = np.round(-low / scale)
    q = np.clip(np.round(x / np.float32(scale)) + zero_point, 0, 255)
    return ((q - zero_point) * np.float32(scale)).astype(np.float32)


def _np_fake_quant_weight(w: np.ndarray) -> np.ndarray:
    # Symmetric 7-bit grid [-64, 64]: what models.int8 exports (onnxruntime's reduce_range).
    scale = np.abs(w).max(axis=1, keepdims=True).astype(np.float64) / 64.0
    return (np.clip(np.round(w / scale), -64, 64) * scale).astype(np.float32)


def test_enable_and_disable_keep_the_state_dict_and_the_float_forward() -> None:
    # Prepare
    model = build_model("mlp", 8, 3, seed=1)
    before = to_numpy_state(model)
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32))
    with torch.no_grad():
        float_out = model(x)

    # Execute
    enable_qat(model)
    with torch.no_grad():
        qat_out = model(x)
    during = to_numpy_state(model)
    disable_qat(model)
    with torch.no_grad():
        restored_out = model(x)

    # Assert
    assert list(during) == list(before)
    for key in before:
        np.testing.assert_array_equal(during[key], before[key])
    assert not torch.equal(qat_out, float_out)
    torch.testing.assert_close(restored_out, float_out, rtol=0, atol=0)
    assert not is_qat_enabled(model)


def test_fake_quantize_activation_matches_reference_and_has_clipped_ste_gradient() -> None:
    # Prepare: a frozen range [-0.5, 2.0]; some values fall outside it.
    x = torch.tensor([-3.0, -0.5, -0.123, 0.0, 0.4567, 1.999, 2.0, 7.5], requires_grad=True)
    upstream = torch.arange(1.0, 9.0)

    # Execute
    y = fake_quantize_activation(x, -0.5, 2.0)
    y.backward(upstream)

    # Assert
    expected = _np_fake_quant_act(x.detach().numpy(), -0.5, 2.0)
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=0, atol=1e-6)
    in_range = (x.detach().numpy() >= -0.5) & (x.detach().numpy() <= 2.0)
    np.testing.assert_array_equal(x.grad.numpy(), np.where(in_range, upstream.numpy(), 0.0))


def test_fake_quantize_weight_is_per_output_channel_symmetric_7_bit() -> None:
    # Prepare
    w = torch.from_numpy(np.random.default_rng(1).normal(size=(5, 7)).astype(np.float32))
    w[2] *= 100.0  # one channel with a much larger range must not coarsen the others
    w.requires_grad_(True)

    # Execute
    wq = fake_quantize_weight(w)
    wq.sum().backward()

    # Assert
    np.testing.assert_allclose(
        wq.detach().numpy(), _np_fake_quant_weight(w.detach().numpy()), atol=1e-6
    )
    levels = wq.detach().numpy() / (np.abs(w.detach().numpy()).max(axis=1, keepdims=True) / 64)
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
    assert np.abs(np.round(levels)).max() == 64
    np.testing.assert_array_equal(w.grad.numpy(), np.ones((5, 7), dtype=np.float32))


def test_activation_qparams_include_zero_and_handle_an_empty_range() -> None:
    # Prepare / Execute
    positive = activation_qparams(0.5, 2.0)  # widened to [0, 2]
    mixed = activation_qparams(-1.0, 3.0)
    constant = activation_qparams(0.0, 0.0)

    # Assert
    assert positive == pytest.approx((2.0 / 255, 0))
    assert mixed == pytest.approx((4.0 / 255, 64))  # round(1 / (4 / 255)) = round(63.75)
    assert constant == (1.0, 0)
    with pytest.raises(ValueError, match="finite"):
        activation_qparams(float("nan"), 1.0)


def test_qat_gradients_equal_the_float_gradients_at_the_quantized_point() -> None:
    # Prepare: logreg, one fresh batch in training mode, so each observer's range is this
    # batch's own range and nothing is clipped: the STE gradient must be the float model's
    # gradient evaluated at the quantized input, weights and logits (computed here in numpy).
    rng = np.random.default_rng(3)
    model = build_model("logreg", 6, 4, seed=3)
    x = rng.normal(size=(9, 6)).astype(np.float32)
    y = rng.integers(0, 4, size=9)
    w = model.linear.weight.detach().numpy().copy()
    b = model.linear.bias.detach().numpy().copy()
    enable_qat(model).train()

    # Execute
    logits = model(torch.from_numpy(x))
    nn.functional.cross_entropy(logits, torch.from_numpy(y)).backward()

    # Assert
    xq = _np_fake_quant_act(x, float(x.min()), float(x.max()))
    z = xq.astype(np.float64) @ _np_fake_quant_weight(w).T.astype(np.float64) + b
    zq = _np_fake_quant_act(z.astype(np.float32), float(z.min()), float(z.max()))
    np.testing.assert_allclose(logits.detach().numpy(), zq, atol=1e-4)
    p = np.exp(zq - zq.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    g = (p - np.eye(4)[y]) / len(y)
    np.testing.assert_allclose(model.linear.weight.grad.numpy(), g.T @ xq, atol=1e-5)
    np.testing.assert_allclose(model.linear.bias.grad.numpy(), g.sum(axis=0), atol=1e-5)


def test_eval_mode_freezes_observed_ranges_and_stops_gradients_outside_them() -> None:
    # Prepare: observe inputs in [0, 1] while training, then evaluate on an input of 5.
    model = enable_qat(build_model("logreg", 2, 2, seed=0))
    model.train()
    model(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    model.eval()
    x = torch.tensor([[0.5, 5.0]], requires_grad=True)

    # Execute
    model(x).sum().backward()

    # Assert: the clipped feature gets no gradient, the in-range one does.
    assert x.grad is not None
    assert x.grad[0, 1].item() == 0.0
    assert x.grad[0, 0].item() != 0.0


def test_a_deep_copy_of_a_qat_model_uses_its_own_weights() -> None:
    # Prepare
    model = enable_qat(build_model("mlp", 4, 3, seed=0))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.fc3.bias.add_(100.0)
    x = torch.ones(2, 4)

    # Execute
    out_model, out_twin = model(x), twin(x)

    # Assert
    assert is_qat_enabled(twin)
    assert not torch.allclose(out_model, out_twin)


def test_a_bare_linear_layer_can_be_its_own_qat_root() -> None:
    # Prepare
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.3, -0.2, 0.1], [0.05, 0.4, -0.33]]))
        layer.bias.copy_(torch.tensor([0.01, -0.02]))
    x = torch.tensor([[0.1, -0.7, 2.0]])
    with torch.no_grad():
        expected = layer(x)

    # Execute
    enable_qat(layer)
    with torch.no_grad():
        quantized = layer(x)
    disable_qat(layer)

    # Assert: close to the float output (a few grid steps of 2.7 / 255), but rounded.
    torch.testing.assert_close(quantized, expected, atol=0.05, rtol=0)
    assert not torch.equal(quantized, expected)
    assert not is_qat_enabled(layer)
    assert "forward" not in vars(layer)


def test_enable_qat_refuses_a_model_without_linear_layers() -> None:
    with pytest.raises(ValueError, match=r"no nn\.Linear"):
        enable_qat(nn.Sequential(nn.ReLU()))


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # Tiny models train ~50x faster on one thread than on cores shared with other jobs.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    data = make_federated("digits", 1, "iid", seed=0)
    (x, y), (x_test, y_test) = data.parts[0], data.test
    return x, y, x_test, y_test


def test_train_local_with_qat_returns_plain_float_weights_with_the_same_keys(
    digits: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> None:
    # Prepare
    x, y, _, _ = digits
    arch = ModelArch("mlp", 64, 10)
    start = to_numpy_state(build_model("mlp", 64, 10))
    hyper = TrainHyper(epochs=1, lr=0.1)

    # Execute
    plain = train_local(arch, start, x[:200], y[:200], hyper, seed=0)
    qat = train_local(arch, start, x[:200], y[:200], hyper, seed=0, qat=True)

    # Assert
    assert list(qat.weights) == list(plain.weights)
    for key, value in qat.weights.items():
        assert value.dtype == np.float32
        assert value.shape == plain.weights[key].shape
    assert not np.array_equal(qat.weights["fc1.weight"], plain.weights["fc1.weight"])
    # Latent float weights, not snapped to the int8 grid.
    w = qat.weights["fc2.weight"]
    levels = w / (np.abs(w).max(axis=1, keepdims=True) / 64)
    assert np.abs(levels - np.round(levels)).max() > 0.1


def test_qat_trained_mlp_keeps_its_fp32_accuracy_in_int8(
    digits: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> None:
    # Prepare: a few epochs of QAT on the digits training split, centrally.
    x, y, x_test, y_test = digits
    arch = ModelArch("mlp", 64, 10)
    start = to_numpy_state(build_model("mlp", 64, 10))
    hyper = TrainHyper(epochs=8, batch_size=32, lr=0.1, momentum=0.9)
    trained = train_local(arch, start, x, y, hyper, seed=0, qat=True)
    fp32 = OnnxTemplate("mlp", 64, 10).render(trained.weights)
    test = EvalSet(x_test, y_test)

    # Execute
    int8 = quantize_int8(fp32, compute_ranges(fp32, x))

    # Assert
    fp32_acc = evaluate_onnx(fp32, test)["accuracy"]
    int8_acc = evaluate_onnx(int8, test)["accuracy"]
    assert fp32_acc > 0.9
    assert int8_acc >= fp32_acc - 0.01
