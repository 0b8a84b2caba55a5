from __future__ import annotations

import math

import pytest

from aggregator.schedules import PlateauConfig, ReduceOnPlateau, with_client_lr
from fedge.envelopes import TrainHyper


def trajectory(s: ReduceOnPlateau, metrics: list[float]) -> list[float]:
    out = []
    for m in metrics:
        s.step(m)
        out.append(s.value)
    return out


def test_reduces_after_more_than_patience_flat_rounds() -> None:
    s = ReduceOnPlateau(0.1, PlateauConfig(mode="max", factor=0.5, patience=2))

    # better, better, bad 1, bad 2, bad 3 > 2 -> halve; then the count restarts.
    got = trajectory(s, [0.5, 0.6, 0.6, 0.59, 0.6, 0.6, 0.6, 0.6])

    assert got == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025])
    assert s.reductions == 2
    assert s.best == 0.6


def test_improvements_reset_the_count() -> None:
    s = ReduceOnPlateau(1.0, PlateauConfig(patience=1))

    got = trajectory(s, [0.1, 0.1, 0.2, 0.2, 0.3, 0.3, 0.3])

    assert got == [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5]


def test_min_mode_for_a_loss() -> None:
    s = ReduceOnPlateau(1.0, PlateauConfig(mode="min", patience=0, factor=0.1))

    got = trajectory(s, [2.0, 1.5, 1.6, 1.4])

    assert got == pytest.approx([1.0, 1.0, 0.1, 0.1])


def test_threshold_is_relative_to_the_best() -> None:
    s = ReduceOnPlateau(1.0, PlateauConfig(patience=0, threshold=0.01))

    # 0.905 is not 1 % better than 0.9: a bad round.
    assert trajectory(s, [0.9, 0.905]) == [1.0, 0.5]


def test_cooldown_ignores_bad_rounds_after_a_reduction() -> None:
    s = ReduceOnPlateau(1.0, PlateauConfig(patience=0, cooldown=2))

    got = trajectory(s, [0.5, 0.5, 0.5, 0.5, 0.5])

    assert got == [1.0, 0.5, 0.5, 0.5, 0.25]


def test_never_below_min_value() -> None:
    s = ReduceOnPlateau(1.0, PlateauConfig(patience=0, factor=0.1, min_value=0.005))

    got = trajectory(s, [0.5] * 6)

    assert got == pytest.approx([1.0, 0.1, 0.01, 0.005, 0.005, 0.005])
    assert s.reductions == 3


def test_nan_metric_counts_as_a_bad_round() -> None:
    s = ReduceOnPlateau(1.0, PlateauConfig(patience=1))

    assert trajectory(s, [0.5, math.nan, math.nan]) == [1.0, 1.0, 0.5]
    assert s.best == 0.5


def test_state_round_trip_mid_run_gives_the_same_future() -> None:
    cfg = PlateauConfig(patience=1, cooldown=1, factor=0.3)
    metrics = [0.1, 0.2, 0.2, 0.2, 0.25, 0.25, 0.25, 0.25, 0.3, 0.3, 0.3]
    a = ReduceOnPlateau(0.5, cfg)
    trajectory(a, metrics[:5])
    b = ReduceOnPlateau(0.5, cfg)

    b.load_state_dict(dict(a.state_dict()))

    assert trajectory(a, metrics[5:]) == trajectory(b, metrics[5:])
    assert a.state_dict() == b.state_dict()


def test_fresh_state_round_trips_infinite_best() -> None:
    a = ReduceOnPlateau(0.5)
    b = ReduceOnPlateau(0.9)

    b.load_state_dict(a.state_dict())

    assert b.best == -math.inf
    assert b.value == 0.5


@pytest.mark.parametrize(
    "state",
    [{}, {"value": 0.0, "best": 0.5, "bad_rounds": 0, "cooldown_left": 0, "reductions": 0}],
)
def test_bad_state_is_refused(state: dict) -> None:
    with pytest.raises(ValueError, match="schedule state"):
        ReduceOnPlateau(0.1).load_state_dict(state)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "up"}, "mode must be max"),
        ({"factor": 1.0}, "factor"),
        ({"patience": -1}, "patience"),
        ({"min_value": 0.0}, "min_value"),
    ],
)
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PlateauConfig(**kwargs)


def test_client_lr_goes_into_the_round_hyper() -> None:
    s = ReduceOnPlateau(0.2, PlateauConfig(patience=0))
    s.step(0.5)
    s.step(0.5)

    hyper = with_client_lr(TrainHyper(epochs=2, lr=0.2, prox_mu=0.1), s)

    assert hyper == TrainHyper(epochs=2, lr=0.1, prox_mu=0.1)
