"""Client-side early stopping on local validation (edge_agent.trainer) and its wire fields."""

from __future__ import annotations

from dataclasses import replace

import msgpack
import numpy as np
import pytest
import torch
from torch import nn

from edge_agent.trainer import train_local
from fedge.envelopes import ModelArch, RoundTask, TrainHyper
from fedge.errors import InvalidValue, ProtocolError
from models.torch_state import load_numpy_state, to_numpy_state
from models.zoo import build_model

ARCH = ModelArch("logreg", 8, 3)


def _data(n: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(0, 1, (n, 8)).astype(np.float32)
    x[:, :3] += 2.0 * np.eye(3, dtype=np.float32)[y]  # learnable, not separable
    return x, y.astype(np.int64)


def _start() -> dict[str, np.ndarray]:
    return to_numpy_state(build_model(ARCH.name, ARCH.input_dim, ARCH.num_classes, 0))


def _held_out_loss(weights: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    m = build_model(ARCH.name, ARCH.input_dim, ARCH.num_classes)
    load_numpy_state(m, weights)
    with torch.no_grad():
        return float(nn.CrossEntropyLoss()(m(torch.from_numpy(x)), torch.from_numpy(y)))


def test_without_early_stopping_every_epoch_runs_on_all_data() -> None:
    x, y = _data()
    r = train_local(ARCH, _start(), x, y, TrainHyper(epochs=4, batch_size=16, lr=0.1), seed=1)
    assert r.epochs == 4
    assert r.num_samples == 120
    assert r.val_loss is None


def test_a_diverging_run_stops_early_and_returns_the_best_epochs_weights() -> None:
    x, y = _data()
    # lr 40 on a softmax regression overshoots: the held-out loss gets worse after epoch 1.
    hyper = TrainHyper(epochs=30, batch_size=8, lr=40.0, early_stop_patience=2, val_fraction=0.25)
    r = train_local(ARCH, _start(), x, y, hyper, seed=1)
    assert r.epochs < 30
    assert r.num_samples == 90  # a quarter held out
    # The held-out examples are the first n_val of torch.randperm(n, seed): recompute them.
    order = torch.randperm(120, generator=torch.Generator().manual_seed(1)).numpy()
    xv, yv = x[order[:30]], y[order[:30]]
    assert r.val_loss == pytest.approx(_held_out_loss(r.weights, xv, yv), rel=1e-5)
    # The best epoch is the one patience epochs back: one epoch fewer gives the same weights.
    shorter = train_local(ARCH, _start(), x, y, replace(hyper, epochs=r.epochs - 1), seed=1)
    assert shorter.val_loss == r.val_loss
    for k, v in r.weights.items():
        np.testing.assert_array_equal(shorter.weights[k], v)


def test_a_run_that_keeps_improving_runs_every_epoch() -> None:
    x, y = _data()
    hyper = TrainHyper(epochs=5, batch_size=16, lr=0.05, early_stop_patience=2, val_fraction=0.2)
    r = train_local(ARCH, _start(), x, y, hyper, seed=0)
    assert r.epochs == 5
    assert r.val_loss is not None
    assert r.val_loss < 1.0986


def test_patience_is_counted_in_epochs_without_improvement() -> None:
    x, y = _data()
    hyper = TrainHyper(epochs=50, batch_size=8, lr=40.0, early_stop_patience=1, val_fraction=0.25)
    one = train_local(ARCH, _start(), x, y, hyper, seed=1)
    three = train_local(ARCH, _start(), x, y, replace(hyper, early_stop_patience=3), seed=1)
    assert one.epochs < three.epochs <= 50


def test_too_little_data_to_hold_out_trains_without_it() -> None:
    x, y = _data(3)
    hyper = TrainHyper(epochs=3, batch_size=2, lr=0.1, early_stop_patience=1, val_fraction=0.2)
    r = train_local(ARCH, _start(), x, y, hyper, seed=0)
    assert (r.epochs, r.num_samples, r.val_loss) == (3, 3, None)


def _task(hyper: TrainHyper) -> RoundTask:
    return RoundTask(1, 0, 2e9, "fp32", hyper, b"n" * 16, None, 1e9)


def test_the_early_stopping_keys_travel_only_when_it_is_on() -> None:
    off = msgpack.unpackb(_task(TrainHyper()).to_bytes())["hyper"]
    assert "early_stop_patience" not in off
    assert "val_fraction" not in off
    on = TrainHyper(early_stop_patience=3, val_fraction=0.1)
    assert RoundTask.from_bytes(_task(on).to_bytes()).hyper == on


@pytest.mark.parametrize(
    "kw", [{"early_stop_patience": 2}, {"val_fraction": 0.6}, {"early_stop_patience": -1}]
)
def test_bad_early_stopping_settings_are_refused(kw: dict) -> None:
    with pytest.raises(InvalidValue, match=r"early_stop_patience|val_fraction"):
        TrainHyper(**kw)


def test_a_task_with_early_stopping_but_no_held_out_share_is_a_schema_error() -> None:
    raw = msgpack.unpackb(_task(TrainHyper()).to_bytes())
    raw["hyper"]["early_stop_patience"] = 2
    with pytest.raises(ProtocolError) as e:
        RoundTask.from_bytes(msgpack.packb(raw))
    assert e.value.reason == "schema"
