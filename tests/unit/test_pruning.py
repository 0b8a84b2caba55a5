"""Federated pruning's pure parts: masks on the wire, the schedule, mask selection, training
under a mask, the strategies' state, the serving model and the pruner's checkpoint."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from aggregator.prune_config import PruningConfig
from aggregator.pruning import Pruner, schedule, structured_units, unstructured_keep
from aggregator.strategies import make_strategy
from edge_agent.residual import Residual
from edge_agent.trainer import train_local
from edge_agent.uplink import Uplink, build_upload, encode_with_feedback
from fedge.codecs import masked_codec, parse_codec
from fedge.envelopes import ModelArch, RoundTask, TrainHyper
from fedge.errors import ConfigError, InvalidValue, ProtocolError
from fedge.identity import SigningKey
from fedge.limits import Limits
from fedge.masks import Mask, live, live_spec, scatter, sparsity
from fedge.tensors import spec_of
from models.onnx_export import OnnxTemplate
from models.onnx_weights import read_initializers
from models.shrink import shrink_onnx
from models.torch_state import to_numpy_state
from models.units import unit_groups
from models.zoo import build_model

DIGITS = ModelArch("mlp", 64, 10)


def _weights(name: str = "mlp", dim: int = 64, classes: int = 10) -> dict[str, np.ndarray]:
    return to_numpy_state(build_model(name, dim, classes, seed=1))


def _pruner(kind: str, target: float, scope: str = "layer") -> Pruner:
    cfg = PruningConfig(kind=kind, target=target, start_round=1, end_round=4, scope=scope)
    return Pruner(cfg, "mlp", make_strategy("fedavgm", {}))


# --- masks on the wire ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["structured", "unstructured"])
def test_mask_round_trips_through_a_signed_task(kind: str) -> None:
    w = _weights()
    p = _pruner(kind, 0.5)
    p.step(4, w)
    assert p.mask is not None
    key = SigningKey.generate()
    task = RoundTask(1, 0, 1e9, "fp32", TrainHyper(), b"n" * 16, mask=p.mask)
    task = RoundTask(**{**task.__dict__, "signature": key.sign(task.digest())})

    back = RoundTask.from_bytes(task.to_bytes())

    assert back.mask == p.mask
    assert key.verify_key.verify(back.digest(), back.signature)
    for name, flags in back.mask.keep(spec_of(w)).items():
        np.testing.assert_array_equal(flags, p.keep[name])
    # Another mask under the same signature does not verify.
    fewer = {k: np.ones_like(v) for k, v in p.keep.items()}
    fewer["fc3.weight"] = p.keep["fc3.weight"].copy()
    fewer["fc3.weight"][0, 0] = False
    other = RoundTask(**{**back.__dict__, "mask": Mask.from_keep(fewer)})
    assert not key.verify_key.verify(other.digest(), back.signature)


def test_a_task_without_mask_signs_the_bytes_it_signed_before() -> None:
    task = RoundTask(1, 0, 1e9, "fp32", TrainHyper(), b"n" * 16)
    assert task.mask is None
    assert b"mask" not in task.to_bytes()
    assert task.digest()[-4:] == b"\x00\x00\x00\x00"  # accepts_from: the last field


@pytest.mark.parametrize(
    "mask",
    [
        Mask(bits={"nope": b"\xff"}),
        Mask(bits={"fc1.bias": b"\xff"}),  # 64 weights need 8 bytes
        Mask(bits={"fc1.bias": b"\x00" * 8}),  # nothing live
        Mask(cuts={"fc1.weight": ((2, (0,)),)}),  # no third axis
        Mask(cuts={"fc1.weight": ((0, (64,)),)}),  # row 64 of 64
    ],
)
def test_a_mask_that_does_not_fit_the_model_is_refused(mask: Mask) -> None:
    with pytest.raises(InvalidValue):
        mask.keep(spec_of(_weights()))


def test_malformed_mask_maps_are_schema_errors() -> None:
    for obj in (
        {"bits": {}},
        {"bits": {"a": "text"}, "cuts": {}},
        {"bits": {}, "cuts": {"a": [[0, b"\x01\x00\x00"]]}},
        {"bits": {}, "cuts": {"a": [[0, np.array([3, 1], "<u4").tobytes()]]}},
    ):
        with pytest.raises(ProtocolError):
            Mask.from_map(obj, 16, 64)


def test_live_and_scatter_are_inverse_on_live_weights() -> None:
    w = _weights()
    p = _pruner("unstructured", 0.75)
    p.step(4, w)
    spec = spec_of(w)

    lv = live(w, p.keep)

    assert spec_of(lv) == live_spec(spec, p.keep)
    assert lv["fc1.weight"].size == int(p.keep["fc1.weight"].sum())
    back = scatter(lv, p.keep, spec)
    for k in w:
        np.testing.assert_array_equal(back[k], w[k])  # w is masked: pruned entries are zero


# --- schedule and selection -------------------------------------------------------------------


def test_cubic_schedule_from_start_to_end() -> None:
    cfg = PruningConfig(kind="unstructured", target=0.8, start_round=2, end_round=12)
    levels = [schedule(cfg, v) for v in range(15)]
    assert levels[:2] == [0.0, 0.0]
    assert levels[12:] == [0.8, 0.8, 0.8]
    steps = np.diff(levels[2:13])
    assert (steps > 0).all()
    assert (np.diff(steps) < 0).all()  # fast first, slow at the end
    assert levels[7] == pytest.approx(0.8 * (1 - 0.5**3))


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_unstructured_prunes_the_smallest_and_only_grows(scope: str) -> None:
    w = _weights()
    first = unstructured_keep(w, {}, 0.5, scope)
    second = unstructured_keep(w, first, 0.8, scope)
    total = sum(w[k].size for k in first)
    assert sum(int((~v).sum()) for v in first.values()) == round(0.5 * total)
    assert sum(int((~v).sum()) for v in second.values()) == round(0.8 * total)
    for k in first:
        assert not (second[k] & ~first[k]).any()  # nothing comes back
    if scope == "layer":
        k = "fc2.weight"
        assert np.abs(w[k][first[k]]).min() >= np.abs(w[k][~first[k]]).max()


def test_structured_prunes_low_norm_units_keeping_one_per_layer() -> None:
    w = _weights()
    w["fc1.weight"][[3, 7]] *= 1e-3
    w["fc1.bias"][[3, 7]] = 0
    units = structured_units(w, unit_groups("mlp"), {}, 2 / 64, "layer")
    assert units["fc1"] == (3, 7)
    everything = structured_units(w, unit_groups("mlp"), {}, 0.999, "global")
    assert all(64 - len(v) >= 1 for v in everything.values())


def test_unit_groups_match_the_built_models() -> None:
    for name, dim in (("mlp", 64), ("cnn1d", 384)):
        spec = spec_of(_weights(name, dim, 7))
        for g in unit_groups(name):
            n = spec[g.weight][0]
            assert all(spec[t][axis] == n for t, axis in g.slices)


# --- devices ----------------------------------------------------------------------------------


def test_training_keeps_pruned_weights_exactly_zero_and_sends_live_weights_only() -> None:
    w = _weights()
    p = _pruner("unstructured", 0.75)
    p.step(4, w)
    rng = np.random.default_rng(0)
    x, y = rng.random((64, 64), dtype=np.float32), rng.integers(0, 10, 64)
    hyper = TrainHyper(epochs=2, batch_size=16, lr=0.1, momentum=0.9, weight_decay=1e-3)

    result = train_local(DIGITS, w, x, y, hyper, seed=0, mask=p.keep)

    for k, flags in p.keep.items():
        assert (result.weights[k][~flags] == 0).all()
        assert (result.weights[k][flags] != w[k][flags]).any()
    task = RoundTask(1, 0, 1e9, "fp32", hyper, b"n" * 16, mask=p.mask)
    masked = build_upload(Uplink("d"), w, result, task, parse_codec("fp32"), Residual())
    dense = build_upload(
        Uplink("d"), w, result, RoundTask(1, 0, 1e9, "fp32", hyper, b"n" * 16),
        parse_codec("fp32"), Residual(),
    )  # fmt: skip
    assert len(masked.update.delta) < 0.4 * len(dense.update.delta)


# --- aggregator -------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["fedavgm", "fedadam"])
def test_strategy_state_of_pruned_weights_is_dropped(strategy: str) -> None:
    w = _weights()
    s = make_strategy(strategy, {})
    s.begin_round(spec_of(w))
    s.fold({k: np.ones_like(v) for k, v in w.items()}, 10)
    s.finish(w)
    p = Pruner(PruningConfig(kind="unstructured", target=0.5, end_round=2), "mlp", s)

    p.step(2, w)

    state = s.state_dict()
    arrays = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
    assert arrays
    for key, value in arrays.items():
        name = key.partition("/")[2]
        if name in p.keep:
            assert (value[~p.keep[name]] == 0).all()
            assert (value[p.keep[name]] != 0).any()


@pytest.mark.parametrize("kind", ["structured", "unstructured"])
def test_pruner_state_restores_the_same_mask(kind: str) -> None:
    w = _weights()
    p = _pruner(kind, 0.6)
    p.step(3, w)
    q = _pruner(kind, 0.6)

    q.load_state_dict(dict(p.state_dict()))
    q.restore(spec_of(w))

    assert q.mask == p.mask
    assert q.level == p.level
    q.step(4, w)  # and the schedule continues from there
    assert all(not (q.keep[k] & ~p.keep[k]).any() for k in p.keep)


@pytest.mark.parametrize(("name", "dim"), [("mlp", 64), ("cnn1d", 384)])
def test_structurally_pruned_onnx_computes_the_masked_dense_model(name: str, dim: int) -> None:
    w = _weights(name, dim, 7)
    cfg = PruningConfig(kind="structured", target=0.5, end_round=2)
    p = Pruner(cfg, name, make_strategy("fedavg", {}))
    p.step(2, w)
    dense = OnnxTemplate(name, dim, 7).render(w)

    small = shrink_onnx(dense, p.cuts())

    # Exactly the live weights are left in the file.
    left = sum(v.size for v in read_initializers(small).values())
    assert left == sum(v.size for v in w.values()) - sum(int((~k).sum()) for k in p.keep.values())
    assert len(small) < len(dense) / 1.6
    x = np.random.default_rng(1).normal(size=(16, dim)).astype(np.float32)
    run = [ort.InferenceSession(m).run(["logits"], {"input": x})[0] for m in (dense, small)]
    np.testing.assert_allclose(run[1], run[0], rtol=1e-5, atol=1e-5)
    assert sparsity(p.keep, spec_of(w)) >= 0.5


def test_prune_spec_parsing() -> None:
    c = PruningConfig.parse("unstructured:0.9@2-20,global", rounds=30)
    assert (c.kind, c.target, c.start_round, c.end_round, c.scope) == (
        "unstructured", 0.9, 2, 20, "global",
    )  # fmt: skip
    assert PruningConfig.parse("structured:0.5", rounds=30).end_round == 20
    for bad in ("structured", "pruned:0.5", "structured:1.5", "structured:0.5@5-3", "x:0.5,row"):
        with pytest.raises(ConfigError):
            PruningConfig.parse(bad, rounds=30)


def test_error_feedback_residual_keeps_the_full_shape_across_a_growing_mask() -> None:
    w = _weights()
    p = _pruner("unstructured", 0.75)
    p.step(2, w)
    first = dict(p.keep)
    delta = {
        k: np.random.default_rng(3).normal(size=v.shape).astype(np.float32) for k, v in w.items()
    }
    codec = parse_codec("topk:0.1+int8")
    rng = np.random.default_rng(0)

    _, after, _ = encode_with_feedback(delta, codec, Residual(), rng, keep=first)
    p.step(3, w)
    _, again, _ = encode_with_feedback(delta, codec, after, rng, keep=p.keep)

    for r in (after, again):
        assert r.spec == spec_of(w)
    for k, flags in p.keep.items():
        assert (again.tensors[k][~flags] == 0).all()
        assert (again.tensors[k][flags] != 0).any()


def _entries_sent(blob: bytes, spec: dict[str, tuple[int, ...]], codec_name: str) -> int:
    decoded = parse_codec(codec_name).decode(blob, spec, Limits())
    return sum(int((v != 0).sum()) for v in decoded.values())


@pytest.mark.parametrize(("kind", "target"), [("structured", 0.5), ("unstructured", 0.9)])
def test_a_masked_update_keeps_the_top_k_budget_of_the_full_model(kind: str, target: float) -> None:
    w = _weights()
    p = _pruner(kind, target)
    p.step(4, w)
    rng = np.random.default_rng(5)
    delta = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in w.items()}
    full = sum(v.size for v in w.values())
    name = "topk:0.03+int8+zstd"
    dense_blob, _, _ = encode_with_feedback(delta, parse_codec(name), Residual(), rng)
    blob, _, _ = encode_with_feedback(delta, parse_codec(name), Residual(), rng, keep=p.keep)
    live_n = full - round(sparsity(p.keep, spec_of(w)) * full)
    assert _entries_sent(dense_blob, spec_of(w), name) == int(np.ceil(0.03 * full))
    sent = _entries_sent(blob, live_spec(spec_of(w), p.keep), name)
    assert sent == int(np.ceil(0.03 * full))  # as many as the dense update, not 3 % of live
    assert sent < live_n
    # A dense codec is untouched, and the budget never exceeds the live entries.
    assert masked_codec(parse_codec("int8+zstd"), full, live_n).name == "int8+zstd"
    assert masked_codec(parse_codec("topk:0.5+fp32"), 100, 10).name == "topk:1.0+fp32"
    assert masked_codec(parse_codec("topk:0.5+fp32"), 100, 100).name == "topk:0.5+fp32"
