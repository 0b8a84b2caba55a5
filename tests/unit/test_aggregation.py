from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.strategies import make_strategy
from aggregator.strategies.accumulator import WeightedSum
from fedge.errors import AggregationError

SPEC = {"fc1.weight": (4, 3), "fc1.bias": (4,), "empty": (0, 2)}


def random_updates(
    n: int, seed: int = 0, spec: dict[str, tuple[int, ...]] = SPEC
) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
    rng = np.random.default_rng(seed)
    deltas = [
        {k: rng.standard_normal(s).astype(np.float32) for k, s in spec.items()} for _ in range(n)
    ]
    num_samples = rng.integers(1, 10_000, size=n)
    return deltas, num_samples


def expected_average(
    deltas: list[dict[str, np.ndarray]], weights: np.ndarray, key: str
) -> np.ndarray:
    stacked = np.stack([d[key].astype(np.float64) for d in deltas])
    return np.average(stacked, axis=0, weights=weights.astype(np.float64))


def array_bytes(obj: object) -> int:
    """Bytes of every numpy array reachable from ``obj``'s attributes (dicts, lists, tuples)."""
    total = 0
    stack: list[object] = list(vars(obj).values())
    while stack:
        item = stack.pop()
        if isinstance(item, np.ndarray):
            total += item.nbytes
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return total


# --- WeightedSum ---------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 12), seed=st.integers(0, 2**32 - 1))
def test_weighted_sum_mean_is_np_average(n: int, seed: int) -> None:
    deltas, weights = random_updates(n, seed)
    acc = WeightedSum(SPEC)

    for d, w in zip(deltas, weights, strict=True):
        acc.add(d, float(w))
    mean = acc.mean()

    assert list(mean) == list(SPEC)
    assert acc.count == n
    assert acc.total_weight == pytest.approx(float(weights.sum()))
    for k, shape in SPEC.items():
        assert mean[k].dtype == np.float32
        assert mean[k].shape == shape
        np.testing.assert_allclose(
            mean[k], expected_average(deltas, weights, k), rtol=1e-5, atol=1e-6
        )


def test_weighted_sum_single_update_is_itself() -> None:
    deltas, _ = random_updates(1)
    acc = WeightedSum(SPEC)

    acc.add(deltas[0], 37.0)

    for k in SPEC:
        np.testing.assert_allclose(acc.mean()[k], deltas[0][k], rtol=1e-6)


def test_weighted_sum_accumulates_in_float64() -> None:
    # In float32, 1e8 + 1 rounds back to 1e8 and the mean below would be 0.
    spec = {"a": (1,)}
    acc = WeightedSum(spec)

    acc.add({"a": np.array([1e8], np.float32)}, 1.0)
    acc.add({"a": np.array([1.0], np.float32)}, 1.0)
    acc.add({"a": np.array([-1e8], np.float32)}, 1.0)

    np.testing.assert_allclose(acc.mean()["a"], np.array([1.0 / 3.0], np.float32), rtol=1e-6)


def test_weighted_sum_empty_mean_raises() -> None:
    acc = WeightedSum(SPEC)

    with pytest.raises(AggregationError, match="no updates"):
        acc.mean()


@pytest.mark.parametrize("weight", [0.0, -1.0, math.nan, -math.inf])
def test_weighted_sum_rejects_bad_weight(weight: float) -> None:
    deltas, _ = random_updates(1)
    acc = WeightedSum(SPEC)

    with pytest.raises(AggregationError, match="weight"):
        acc.add(deltas[0], weight)

    assert acc.count == 0
    assert acc.total_weight == 0.0


def test_weighted_sum_holds_one_model_of_float64_whatever_the_count() -> None:
    spec = {"w": (64, 64), "b": (64,)}
    model_f64_bytes = sum(math.prod(s) for s in spec.values()) * 8
    acc = WeightedSum(spec)
    rng = np.random.default_rng(1)

    for _ in range(1000):
        acc.add({k: rng.standard_normal(s).astype(np.float32) for k, s in spec.items()}, 3.0)

    assert acc.count == 1000
    assert {k: v.shape for k, v in acc.sums.items()} == spec
    assert array_bytes(acc) == model_f64_bytes


# --- FedAvg --------------------------------------------------------------------


@pytest.mark.parametrize("server_lr", [1.0, 0.5, 2.0, 0.0])
def test_fedavg_applies_weighted_mean_with_server_lr(server_lr: float) -> None:
    deltas, num_samples = random_updates(7, seed=3)
    rng = np.random.default_rng(4)
    weights = {k: rng.standard_normal(s).astype(np.float32) for k, s in SPEC.items()}
    strategy = make_strategy("fedavg", server_lr)

    strategy.begin_round(SPEC)
    for d, n in zip(deltas, num_samples, strict=True):
        strategy.fold(d, int(n))
    out = strategy.finish(weights)

    assert strategy.count == 7
    assert list(out) == list(weights)
    for k in SPEC:
        expected = weights[k].astype(np.float64) + server_lr * expected_average(
            deltas, num_samples, k
        )
        assert out[k].dtype == np.float32
        np.testing.assert_allclose(out[k], expected, rtol=1e-5, atol=1e-6)


def test_fedavg_does_not_modify_input_weights() -> None:
    deltas, num_samples = random_updates(2)
    weights = {k: np.ones(s, np.float32) for k, s in SPEC.items()}
    before = {k: v.copy() for k, v in weights.items()}
    strategy = make_strategy("fedavg")

    strategy.begin_round(SPEC)
    for d, n in zip(deltas, num_samples, strict=True):
        strategy.fold(d, int(n))
    strategy.finish(weights)

    for k in SPEC:
        np.testing.assert_array_equal(weights[k], before[k])


def test_fedavg_equal_samples_is_plain_mean() -> None:
    deltas, _ = random_updates(4, seed=9)
    weights = {k: np.zeros(s, np.float32) for k, s in SPEC.items()}
    strategy = make_strategy("fedavg")

    strategy.begin_round(SPEC)
    for d in deltas:
        strategy.fold(d, 10)
    out = strategy.finish(weights)

    for k in SPEC:
        expected = np.mean(np.stack([d[k] for d in deltas]).astype(np.float64), axis=0)
        np.testing.assert_allclose(out[k], expected, rtol=1e-5, atol=1e-6)


def test_fedavg_empty_round_raises() -> None:
    strategy = make_strategy("fedavg")
    strategy.begin_round(SPEC)

    with pytest.raises(AggregationError):
        strategy.finish({k: np.zeros(s, np.float32) for k, s in SPEC.items()})

    assert strategy.count == 0


def test_fedavg_fold_or_finish_before_begin_round_raises() -> None:
    deltas, _ = random_updates(1)
    strategy = make_strategy("fedavg")

    with pytest.raises(AggregationError, match="begin_round"):
        strategy.fold(deltas[0], 1)
    with pytest.raises(AggregationError, match="begin_round"):
        strategy.finish(deltas[0])
    assert strategy.count == 0


@pytest.mark.parametrize("num_samples", [0, -5])
def test_fedavg_rejects_non_positive_samples(num_samples: int) -> None:
    deltas, _ = random_updates(1)
    strategy = make_strategy("fedavg")
    strategy.begin_round(SPEC)

    with pytest.raises(AggregationError):
        strategy.fold(deltas[0], num_samples)


def test_fedavg_begin_round_forgets_the_previous_round() -> None:
    first, _ = random_updates(3, seed=1)
    second, n2 = random_updates(2, seed=2)
    weights = {k: np.zeros(s, np.float32) for k, s in SPEC.items()}
    strategy = make_strategy("fedavg")
    strategy.begin_round(SPEC)
    for d in first:
        strategy.fold(d, 100)

    strategy.begin_round(SPEC)
    for d, n in zip(second, n2, strict=True):
        strategy.fold(d, int(n))
    out = strategy.finish(weights)

    assert strategy.count == 2
    for k in SPEC:
        np.testing.assert_allclose(out[k], expected_average(second, n2, k), rtol=1e-5, atol=1e-6)


def test_fedavg_memory_stays_one_model_over_1000_updates() -> None:
    spec = {"w": (100, 100), "b": (100,)}
    model_f64_bytes = sum(math.prod(s) for s in spec.values()) * 8
    strategy = make_strategy("fedavg")
    rng = np.random.default_rng(0)
    strategy.begin_round(spec)

    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(1000):
            strategy.fold(
                {k: rng.standard_normal(s).astype(np.float32) for k, s in spec.items()}, 5
            )
        retained = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()

    assert strategy.count == 1000
    # 1000 float32 updates would be ~40 MB; the running sum is one float64 model (~80 KB).
    assert retained < model_f64_bytes


def test_unknown_strategy() -> None:
    with pytest.raises(ValueError, match="fedavg"):
        make_strategy("fedsgd-nonexistent")
