"""models.zoo, models.torch_state and models.onnx_export against torch and onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from models.onnx_export import OnnxTemplate, export_onnx
from models.onnx_weights import read_initializers
from models.torch_state import load_numpy_state, to_numpy_state
from models.zoo import build_model, list_models

INPUT_DIM = 12
NUM_CLASSES = 5

EXPECTED_SHAPES = {
    "mlp": {
        "fc1.weight": (64, INPUT_DIM),
        "fc1.bias": (64,),
        "fc2.weight": (64, 64),
        "fc2.bias": (64,),
        "fc3.weight": (NUM_CLASSES, 64),
        "fc3.bias": (NUM_CLASSES,),
    },
    "logreg": {"linear.weight": (NUM_CLASSES, INPUT_DIM), "linear.bias": (NUM_CLASSES,)},
}


def _torch_logits(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module.eval()(torch.from_numpy(x)).numpy()


def _ort_logits(onnx_bytes: bytes, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": x})[0]


def _random_state(name: str, seed: int) -> dict[str, np.ndarray]:
    # Scale like torch's default init so logits stay O(1) and atol=1e-5 is meaningful.
    rng = np.random.default_rng(seed)
    return {
        key: rng.normal(scale=0.3, size=shape).astype(np.float32)
        for key, shape in EXPECTED_SHAPES[name].items()
    }


@pytest.fixture(scope="module", params=["mlp", "logreg"])
def exported(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module, bytes]:
    module = build_model(request.param, INPUT_DIM, NUM_CLASSES, seed=7)
    return request.param, module, export_onnx(module, INPUT_DIM)


# --- zoo ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "logreg"])
def test_build_model_has_the_documented_parameter_names_and_shapes(name: str) -> None:
    # Execute
    module = build_model(name, INPUT_DIM, NUM_CLASSES)

    # Assert
    shapes = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    assert shapes == EXPECTED_SHAPES[name]
    assert list(shapes) == list(EXPECTED_SHAPES[name])


@pytest.mark.parametrize("name", ["mlp", "logreg"])
def test_build_model_is_deterministic_per_seed_and_differs_across_seeds(name: str) -> None:
    # Execute
    first = to_numpy_state(build_model(name, INPUT_DIM, NUM_CLASSES, seed=3))
    again = to_numpy_state(build_model(name, INPUT_DIM, NUM_CLASSES, seed=3))
    other = to_numpy_state(build_model(name, INPUT_DIM, NUM_CLASSES, seed=4))

    # Assert
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
        assert not np.array_equal(first[key], other[key]), key


def test_build_model_leaves_the_global_rng_alone() -> None:
    # Prepare
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)

    # Execute
    build_model("mlp", INPUT_DIM, NUM_CLASSES, seed=99)
    actual = torch.rand(4)

    # Assert
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_build_model_maps_a_batch_to_logits() -> None:
    # Prepare
    module = build_model("mlp", INPUT_DIM, NUM_CLASSES)

    # Execute
    logits = module(torch.zeros(3, INPUT_DIM))

    # Assert
    assert logits.shape == (3, NUM_CLASSES)
    assert logits.dtype == torch.float32


def test_build_model_rejects_unknown_names_listing_known_ones() -> None:
    with pytest.raises(ValueError, match=r"^unknown model 'x'; known: cnn1d, logreg, mlp$"):
        build_model("x", INPUT_DIM, NUM_CLASSES)


@pytest.mark.parametrize(("input_dim", "num_classes"), [(0, 3), (4, 1)])
def test_build_model_rejects_degenerate_sizes(input_dim: int, num_classes: int) -> None:
    with pytest.raises(ValueError, match="must be >="):
        build_model("logreg", input_dim, num_classes)


def test_list_models_names_every_architecture_sorted() -> None:
    assert [spec.name for spec in list_models()] == ["cnn1d", "logreg", "mlp"]
    assert all(spec.description for spec in list_models())


# --- torch_state -------------------------------------------------------------------


def test_to_numpy_state_returns_float32_contiguous_copies_in_state_dict_order() -> None:
    # Prepare
    module = build_model("mlp", INPUT_DIM, NUM_CLASSES, seed=1)
    before = module.state_dict()["fc1.weight"].clone()

    # Execute
    state = to_numpy_state(module)
    state["fc1.weight"][:] = 0.0

    # Assert
    assert list(state) == list(module.state_dict())
    assert all(a.dtype == np.float32 and a.flags.c_contiguous for a in state.values())
    torch.testing.assert_close(module.state_dict()["fc1.weight"], before, rtol=0, atol=0)


def test_to_numpy_state_refuses_integer_buffers() -> None:
    module = torch.nn.BatchNorm1d(3)  # has an int64 num_batches_tracked buffer

    with pytest.raises(ValueError, match="num_batches_tracked"):
        to_numpy_state(module)


def test_load_numpy_state_round_trips_exactly() -> None:
    # Prepare
    module = build_model("mlp", INPUT_DIM, NUM_CLASSES, seed=0)
    state = _random_state("mlp", seed=5)

    # Execute
    load_numpy_state(module, state)

    # Assert
    loaded = {key: value.detach().numpy() for key, value in module.state_dict().items()}
    for key, value in state.items():
        np.testing.assert_array_equal(loaded[key], value)


def test_load_numpy_state_rejects_missing_and_extra_keys() -> None:
    module = build_model("logreg", INPUT_DIM, NUM_CLASSES)
    state = _random_state("logreg", seed=0)
    state["bogus"] = state.pop("linear.bias")

    with pytest.raises(ValueError, match=r"missing \['linear.bias'\], unexpected \['bogus'\]"):
        load_numpy_state(module, state)


def test_load_numpy_state_rejects_wrong_shapes_without_changing_the_module() -> None:
    # Prepare
    module = build_model("logreg", INPUT_DIM, NUM_CLASSES)
    before = to_numpy_state(module)
    state = _random_state("logreg", seed=0)
    state["linear.weight"] = state["linear.weight"].T.copy()

    # Execute
    with pytest.raises(ValueError, match=r"shape mismatch for 'linear\.weight'"):
        load_numpy_state(module, state)

    # Assert
    after = to_numpy_state(module)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])


# --- onnx_export -------------------------------------------------------------------


def test_export_initializers_equal_the_torch_state_bit_exactly(
    exported: tuple[str, torch.nn.Module, bytes],
) -> None:
    # Prepare
    _, module, onnx_bytes = exported
    expected = to_numpy_state(module)

    # Execute
    actual = read_initializers(onnx_bytes)

    # Assert
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert actual[key].dtype == np.float32
        np.testing.assert_array_equal(actual[key], value)


def test_export_is_self_contained_with_named_io(
    exported: tuple[str, torch.nn.Module, bytes],
) -> None:
    # Execute
    model = onnx.load_model_from_string(exported[2])

    # Assert
    assert [value.name for value in model.graph.input] == ["input"]
    assert [value.name for value in model.graph.output] == ["logits"]
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param  # symbolic, i.e. dynamic
    assert all(
        not t.HasField("data_location") or t.data_location == 0 for t in model.graph.initializer
    )


@pytest.mark.parametrize("batch", [1, 7])
def test_onnxruntime_logits_match_torch(
    exported: tuple[str, torch.nn.Module, bytes], batch: int
) -> None:
    # Prepare
    _, module, onnx_bytes = exported
    x = np.random.default_rng(batch).normal(size=(batch, INPUT_DIM)).astype(np.float32)

    # Execute
    actual = _ort_logits(onnx_bytes, x)

    # Assert
    np.testing.assert_allclose(actual, _torch_logits(module, x), rtol=0, atol=1e-5)


def test_export_restores_the_training_flag() -> None:
    module = build_model("logreg", INPUT_DIM, NUM_CLASSES).train()

    export_onnx(module, INPUT_DIM)

    assert module.training


@pytest.mark.parametrize("name", ["mlp", "logreg"])
def test_template_render_runs_new_weights_like_torch(name: str) -> None:
    # Prepare
    template = OnnxTemplate(name, INPUT_DIM, NUM_CLASSES)
    state = _random_state(name, seed=11)
    reference = build_model(name, INPUT_DIM, NUM_CLASSES, seed=0)
    load_numpy_state(reference, state)
    x = np.random.default_rng(2).normal(size=(7, INPUT_DIM)).astype(np.float32)

    # Execute
    rendered = template.render(state)

    # Assert
    np.testing.assert_allclose(
        _ort_logits(rendered, x), _torch_logits(reference, x), rtol=0, atol=1e-5
    )
    assert template.render(state) == rendered  # deterministic bytes


def test_template_render_refuses_a_partial_state() -> None:
    template = OnnxTemplate("logreg", INPUT_DIM, NUM_CLASSES)
    state = _random_state("logreg", seed=0)
    del state["linear.bias"]

    with pytest.raises(ValueError, match=r"lacks weights \['linear.bias'\]"):
        template.render(state)


def test_template_rejects_unknown_models_at_construction() -> None:
    with pytest.raises(ValueError, match="unknown model 'cnn'"):
        OnnxTemplate("cnn", INPUT_DIM, NUM_CLASSES)
