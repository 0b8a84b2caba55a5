"""Fine-tuning chosen tensors (``model.trainable``): the task field and its signature, patterns,
training with frozen tensors, what the update carries, the aggregator's reading of it and the
strategies' state for frozen tensors."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import msgpack
import numpy as np
import pytest

from aggregator.config import AggregatorConfig, ModelConfig
from aggregator.finetune import FineTune
from aggregator.rounds import OpenRound
from aggregator.strategies import STRATEGIES, make_strategy
from aggregator.validation import validate_update
from edge_agent.residual import Residual
from edge_agent.round_plan import plan_round
from edge_agent.trainer import train_local
from edge_agent.uplink import Uplink, build_upload
from fedge.codecs import parse_codec
from fedge.envelopes import ModelArch, ModelUpdate, RoundTask, TrainHyper
from fedge.errors import ConfigError, InvalidValue, ProtocolError
from fedge.identity import SigningKey
from fedge.limits import DEFAULT_LIMITS
from fedge.tensors import spec_of
from fedge.trainable import resolve, split_patterns
from fedge.wire import pack
from models.torch_state import to_numpy_state
from models.zoo import build_model

DIGITS = ModelArch("mlp", 64, 10)
LAST = ("fc3.weight", "fc3.bias")


def _weights() -> dict[str, np.ndarray]:
    return to_numpy_state(build_model("mlp", 64, 10, seed=1))


def _task(**changes: object) -> RoundTask:
    t = RoundTask(
        7, 6, 1000.5, "int8+zstd", TrainHyper(epochs=2, lr=0.05), bytes(range(16)),
        selected=("dev-1", "dev-2"), issued=999.0, accepts_from=5,
    )  # fmt: skip
    return replace(t, **changes)


# --- the task field ---------------------------------------------------------------------------


def test_a_task_without_trainable_signs_the_bytes_it_did_before_and_sends_no_key() -> None:
    # Both hashes were computed with the code before the field existed (git archive of the
    # parent commit, the same task): a device that never heard of fine-tuning still verifies.
    task = _task()
    assert hashlib.sha256(task.digest()).hexdigest() == (
        "f38373f2f648775cf94c6dac513dd607db35cd41a87c07cd38234f5ea5f0c467"
    )
    # The wire bytes changed since (default-valued hyper keys are left off, protocol §5.2), but
    # not because of this field: a task without it carries no `trainable` key at all.
    assert "trainable" not in msgpack.unpackb(task.to_bytes())


def test_trainable_round_trips_under_the_signature() -> None:
    key = SigningKey.generate()
    task = _task(trainable=LAST)
    signed = replace(task, signature=key.sign(task.digest()))

    back = RoundTask.from_bytes(signed.to_bytes())

    assert back.trainable == LAST
    assert back.digest() != _task().digest()
    assert key.verify_key.verify(back.digest(), back.signature)
    for other in (("fc3.weight",), ("fc3.bias", "fc3.weight"), ("fc2.weight", "fc3.bias")):
        assert not key.verify_key.verify(replace(back, trainable=other).digest(), back.signature)


@pytest.mark.parametrize("bad", [[], ["fc3.bias", "fc3.bias"], ["fc3.bias", 3], "fc3.bias", [""]])
def test_malformed_trainable_is_a_schema_error(bad: object) -> None:
    raw = msgpack.unpackb(_task().to_bytes())
    raw["trainable"] = bad

    with pytest.raises(ProtocolError) as e:
        RoundTask.from_bytes(pack(raw))

    assert e.value.reason == "schema"


# --- patterns ---------------------------------------------------------------------------------


def test_patterns_resolve_in_model_order_and_refuse_what_cannot_be_meant() -> None:
    names = list(_weights())
    assert resolve(["fc3.*"], names) == LAST
    assert resolve(["*.bias"], names) == ("fc1.bias", "fc2.bias", "fc3.bias")
    with pytest.raises(InvalidValue, match=r"'conv9\.\*' matches no tensor"):
        resolve(["fc3.*", "conv9.*"], names)
    with pytest.raises(InvalidValue, match="every tensor"):
        resolve(["*"], names)
    assert split_patterns(" fc3.*, fc2.bias ,") == ("fc3.*", "fc2.bias")
    assert split_patterns("") is None
    with pytest.raises(ConfigError, match=r"model.trainable: .*'fc9\*'"):
        FineTune.bind(["fc9*"], _weights())


def test_config_refuses_trainable_with_secure_aggregation_or_pruning() -> None:
    model = ModelConfig(trainable=["fc3.*"])
    AggregatorConfig(model=model)  # alone: fine
    with pytest.raises(ValueError, match="does not combine"):
        AggregatorConfig(model=model, pruning={"kind": "unstructured", "target": 0.5})
    with pytest.raises(ValueError, match="at least one"):
        ModelConfig(trainable=[])


# --- devices ----------------------------------------------------------------------------------


def test_a_device_refuses_a_task_naming_tensors_its_model_lacks() -> None:
    w = _weights()
    assert plan_round(_task(trainable=LAST), w).train_kwargs() == {"trainable": LAST}
    assert plan_round(_task(), w).train_kwargs() == {}

    with pytest.raises(ValueError, match=r"cannot honour trainable: .*conv9.weight"):
        plan_round(_task(trainable=("fc3.weight", "conv9.weight")), w)


def test_training_moves_only_trainable_tensors_and_sends_only_them() -> None:
    w = _weights()
    rng = np.random.default_rng(0)
    x, y = rng.random((64, 64), dtype=np.float32), rng.integers(0, 10, 64)
    hyper = TrainHyper(epochs=2, batch_size=16, lr=0.1, momentum=0.9, weight_decay=1e-3)

    result = train_local(DIGITS, w, x, y, hyper, seed=0, trainable=LAST)

    for k, v in result.weights.items():
        if k in LAST:
            assert (v != w[k]).any(), k
        else:
            assert v.tobytes() == w[k].tobytes(), k
    task = RoundTask(1, 0, 1e9, "int8+zstd", hyper, b"n" * 16, trainable=LAST)
    up = build_upload(Uplink("d"), w, result, task, parse_codec("int8+zstd"), Residual())
    sent = parse_codec("int8+zstd").decode(
        up.update.delta, {k: w[k].shape for k in LAST}, DEFAULT_LIMITS
    )
    assert list(sent) == list(LAST)
    # Error feedback keeps a residual for the trainable tensors only.
    assert all(not up.residual.tensors[k].any() for k in w if k not in LAST)
    assert any(up.residual.tensors[k].any() for k in LAST)


# --- aggregator -------------------------------------------------------------------------------


def _update(delta: dict[str, np.ndarray], task: RoundTask) -> bytes:
    return ModelUpdate(
        device="dev-1", round=task.round, base_version=task.base_version, update_id="u",
        nonce=task.nonce, num_samples=10, codec="fp32",
        delta=parse_codec("fp32").encode(delta),
    ).to_bytes()  # fmt: skip


def test_the_aggregator_reads_exactly_the_trainable_tensors() -> None:
    w = _weights()
    spec = spec_of(w)
    task = _task(codec="fp32", trainable=LAST, selected=None)
    rnd = OpenRound(task=task, opened_at=0.0)
    rng = np.random.default_rng(1)
    full = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in w.items()}

    acc = validate_update("dev-1", _update({k: full[k] for k in LAST}, task), rnd, spec,
                          DEFAULT_LIMITS, 5000)  # fmt: skip

    assert list(acc.delta) == list(spec)
    for k, v in acc.delta.items():
        np.testing.assert_array_equal(v, full[k] if k in LAST else np.zeros_like(v))
    for wrong in (
        full,
        {"fc3.weight": full["fc3.weight"]},
        {k: full[k] for k in spec if k not in LAST},
    ):
        with pytest.raises(ProtocolError) as e:
            validate_update("dev-1", _update(wrong, task), rnd, spec, DEFAULT_LIMITS, 5000)
        assert e.value.reason == "bad_tensor"


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_leaves_frozen_tensors_and_their_state_alone(name: str) -> None:
    w = _weights()
    spec = spec_of(w)
    strategy = make_strategy(name, {})
    ft = FineTune.bind(["fc3.*"], w)
    rng = np.random.default_rng(2)
    weights = w
    for _ in range(3):
        strategy.begin_round(spec)
        for _ in range(5):
            delta = {
                k: (rng.standard_normal(s).astype(np.float32) if k in LAST else np.zeros(s, "f4"))
                for k, s in spec.items()
            }
            strategy.fold(delta, 10)
        new = ft.hold(weights, strategy.finish(weights), strategy, ft.names)
        for k in spec:
            if k not in LAST:
                assert new[k].tobytes() == w[k].tobytes(), (name, k)
        assert any((new[k] != weights[k]).any() for k in LAST), name
        weights = new
    for key, value in strategy.state_dict().items():
        tensor = key.partition("/")[2]
        if tensor in spec and tensor not in LAST and isinstance(value, np.ndarray):
            assert not value.any(), (name, key)


def test_simulate_takes_comma_separated_patterns() -> None:
    from fedge_cli.main import build_parser

    args = build_parser().parse_args(["simulate", "--trainable", "fc3.*, fc2.bias"])

    assert split_patterns(args.trainable) == ("fc3.*", "fc2.bias")
