"""Sharded aggregation's entry into a strategy: a pre-summed share folds like its updates."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.strategies import make_strategy
from aggregator.strategies.accumulator import WeightedSum
from fedge.errors import AggregationError

SPEC = {"w": (3, 4), "b": (3,)}


def _updates(n: int, seed: int = 0) -> list[tuple[dict[str, np.ndarray], int]]:
    rng = np.random.default_rng(seed)
    return [
        ({k: rng.normal(0, 1, s).astype(np.float32) for k, s in SPEC.items()}, 5 + 3 * i)
        for i in range(n)
    ]


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedadam", "fedprox"])
def test_two_shares_give_the_model_of_folding_every_update(name: str) -> None:
    weights = {k: np.ones(s, np.float32) for k, s in SPEC.items()}
    ups = _updates(6)
    one = make_strategy(name)
    one.begin_round(SPEC)
    for d, n in ups:
        one.fold(d, n)
    expected = one.finish(weights)

    sharded = make_strategy(name)
    sharded.begin_round(SPEC)
    for share in (ups[:2], ups[2:]):  # what two workers would sum, in float64
        acc = WeightedSum(SPEC, np.float64)
        for d, n in share:
            acc.add(d, n)
        sharded.fold_sum(acc.sums, acc.total_weight, acc.count)
    assert sharded.count == 6
    got = sharded.finish(weights)
    for k in SPEC:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("sums", "weight", "count", "match"),
    [
        ({"w": np.zeros((3, 4))}, 1.0, 1, "tensors"),
        ({"w": np.zeros((4, 3)), "b": np.zeros(3)}, 1.0, 1, "shape"),
        ({"w": np.full((3, 4), np.nan), "b": np.zeros(3)}, 1.0, 1, "NaN"),
        ({"w": np.zeros((3, 4)), "b": np.zeros(3)}, 0.0, 1, "total_weight"),
        ({"w": np.zeros((3, 4)), "b": np.zeros(3)}, 1.0, 0, "count"),
    ],
)
def test_a_bad_share_is_refused_whole(sums: dict, weight: float, count: int, match: str) -> None:
    acc = WeightedSum(SPEC, np.float32)
    acc.add({k: np.ones(s, np.float32) for k, s in SPEC.items()}, 2.0)
    before = {k: v.copy() for k, v in acc.sums.items()}
    with pytest.raises(AggregationError, match=match):
        acc.add_sum(sums, weight, count)
    assert (acc.total_weight, acc.count) == (2.0, 1)
    for k in SPEC:
        np.testing.assert_array_equal(acc.sums[k], before[k])


def test_fold_sum_before_begin_round_is_an_error() -> None:
    with pytest.raises(AggregationError):
        make_strategy("fedavg").fold_sum({}, 1.0, 1)  # type: ignore[attr-defined]
