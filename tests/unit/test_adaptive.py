"""The service's adaptive learning rates: device lr and server lr on plateaus of accuracy."""

from __future__ import annotations

import pytest

from aggregator.adaptive import AdaptiveLR
from aggregator.config import AggregatorConfig, HyperConfig, PlateauSettings
from aggregator.strategies import make_strategy
from fedge.envelopes import TrainHyper

FLAT = PlateauSettings(factor=0.5, patience=1, threshold=0.0, min_lr=1e-3)


def _adaptive(**cfg: object) -> AdaptiveLR:
    config = AggregatorConfig(hyper=HyperConfig(lr=0.2), **cfg)  # type: ignore[arg-type]
    return AdaptiveLR(config, make_strategy(config.strategy), has_eval=True)


def test_off_by_default_changes_nothing() -> None:
    a = _adaptive()
    metrics = {"accuracy": 0.5}
    for _ in range(5):
        a.step(metrics, 0.2)
    assert not a
    assert metrics == {"accuracy": 0.5}
    assert a.hyper(TrainHyper(lr=0.2)).lr == 0.2
    assert a.state_dict() == {}


def test_server_lr_halves_after_a_plateau_and_the_strategy_uses_it() -> None:
    a = _adaptive(adaptive_server_lr=FLAT)
    seen = []
    for acc in [0.5, 0.6, 0.6, 0.6, 0.6, 0.6]:
        m = {"accuracy": acc}
        a.step(m, 0.2)
        seen.append(m["server_lr"])
    # FedAvg's server_lr starts at 1; patience 1: the 2nd round without a better accuracy
    # halves it for the next version. Metrics show the rate each version was made with.
    assert seen == [1.0, 1.0, 1.0, 1.0, 0.5, 0.5]
    assert a.strategy.server_lr == 0.25
    assert "client_lr" not in m


def test_client_and_server_schedules_are_independent_and_restored_from_a_checkpoint() -> None:
    a = _adaptive(adaptive_lr=FLAT, adaptive_server_lr=FLAT, strategy="fedadam")
    assert a.strategy.server_lr == pytest.approx(1e-2)  # FedAdam's own default
    for acc in [0.5, 0.5, 0.5]:
        a.step({"accuracy": acc}, a.hyper(TrainHyper(lr=0.2)).lr)
    assert a.hyper(TrainHyper(lr=0.2)).lr == 0.1
    assert a.strategy.server_lr == pytest.approx(5e-3)
    state = a.state_dict()

    b = _adaptive(adaptive_lr=FLAT, adaptive_server_lr=FLAT, strategy="fedadam")
    b.load_state_dict({**state, "strategy.server_lr": 1e-2, "other": 1})
    assert b.hyper(TrainHyper(lr=0.2)).lr == 0.1
    assert b.strategy.server_lr == pytest.approx(5e-3)
    assert b.state_dict() == state


def test_a_round_without_accuracy_steps_nothing() -> None:
    a = _adaptive(adaptive_server_lr=FLAT)
    for _ in range(4):
        a.step({}, 0.2)
    assert a.strategy.server_lr == 1.0
