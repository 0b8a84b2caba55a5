from __future__ import annotations

import numpy as np
import pytest

from aggregator.strategies import make_strategy
from aggregator.strategies.staleness import AsyncBuffer, StalenessWeight
from fedge.errors import AggregationError, InvalidValue

SPEC = {"w": (3, 2), "b": (3,)}


def deltas(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {k: rng.standard_normal(s).astype(np.float32) for k, s in SPEC.items()} for _ in range(n)
    ]


def zeros() -> dict[str, np.ndarray]:
    return {k: np.zeros(s, np.float32) for k, s in SPEC.items()}


@pytest.mark.parametrize(
    ("spec", "values"),
    [
        ("poly:0.5", {0: 1.0, 3: 0.5, 8: 1 / 3}),
        ("poly", {0: 1.0, 15: 0.25}),
        ("poly:1", {0: 1.0, 4: 0.2}),
        ("const", {0: 1.0, 100: 1.0}),
        ("hinge:10,4", {0: 1.0, 4: 1.0, 5: 1 / 11, 6: 1 / 21}),
    ],
)
def test_staleness_weights(spec: str, values: dict[int, float]) -> None:
    w = StalenessWeight.parse(spec)

    assert {s: w(s) for s in values} == pytest.approx(values)


def test_default_staleness_weight_is_inverse_sqrt() -> None:
    assert StalenessWeight()(24) == pytest.approx(0.2)


@pytest.mark.parametrize(
    "spec", ["poly:a", "exp:2", "hinge:1", "hinge:1,2.5", "const:3", "poly:-1"]
)
def test_bad_staleness_weight_spec(spec: str) -> None:
    with pytest.raises(InvalidValue, match="bad staleness weight"):
        StalenessWeight.parse(spec)


def test_buffer_weights_by_staleness_and_publishes_every_k() -> None:
    strategy = make_strategy("fedavg")
    buf = AsyncBuffer(strategy, SPEC, buffer_size=3, max_staleness=10)
    ds, samples, stale = deltas(3, seed=1), [10, 30, 60], [0, 3, 8]
    w0 = {k: v + 1 for k, v in zeros().items()}

    accepted = []
    for d, n, s in zip(ds, samples, stale, strict=True):
        assert not buf.ready
        accepted.append(buf.offer(d, n, s))
    stats = buf.stats()
    new = buf.flush(w0)

    # sum_i n_i (1+s_i)^-1/2 delta_i / sum_i n_i, computed by hand weights 1, 1/2, 1/3.
    want = {k: 1 + (10 * ds[0][k] + 30 * 0.5 * ds[1][k] + 60 / 3 * ds[2][k]) / 100 for k in SPEC}
    for k in SPEC:
        np.testing.assert_allclose(new[k], want[k], rtol=1e-5)
    assert accepted == [True, True, True]
    assert stats == {
        "buffered": 3,
        "staleness_mean": 11 / 3,
        "staleness_max": 8,
        "dropped_stale": 0,
    }
    assert buf.pending == 0
    assert not buf.ready
    assert buf.flushes == 1


def test_updates_older_than_the_window_are_dropped() -> None:
    buf = AsyncBuffer(make_strategy("fedavg"), SPEC, buffer_size=2, max_staleness=4)
    d = deltas(3, seed=2)

    results = [buf.offer(d[0], 5, 4), buf.offer(d[1], 5, 5), buf.offer(d[2], 5, 0)]
    new = buf.flush(zeros())

    assert results == [True, False, True]
    assert buf.dropped_stale == 1
    for k in SPEC:
        np.testing.assert_allclose(new[k], (d[0][k] / np.sqrt(5) + d[2][k]) / 2, rtol=1e-5)


def test_buffer_reuses_a_server_optimizer_across_flushes() -> None:
    opts = {"server_lr": "0.1", "tau": "0.01", "beta1": "0.5", "beta2": "0.9"}
    buffered = AsyncBuffer(
        make_strategy("fedadam", opts), SPEC, buffer_size=2, weight=StalenessWeight("const")
    )
    sync = make_strategy("fedadam", opts)
    w_async = w_sync = zeros()

    for r in range(3):
        ds = deltas(2, seed=10 + r)
        for d in ds:
            buffered.offer(d, 4, staleness=r)
        w_async = buffered.flush(w_async)
        sync.begin_round(SPEC)
        for d in ds:
            sync.fold(d, 4)
        w_sync = sync.finish(w_sync)

    for k in SPEC:
        np.testing.assert_array_equal(w_async[k], w_sync[k])
    assert buffered.strategy.t == 3


def test_a_refused_update_leaves_the_buffer_as_it_was() -> None:
    buf = AsyncBuffer(make_strategy("median"), SPEC, buffer_size=2)
    d = deltas(1, seed=3)[0]
    bad = {k: np.full(s, np.nan, np.float32) for k, s in SPEC.items()}

    with pytest.raises(AggregationError):
        buf.offer(bad, 1, 0)
    with pytest.raises(AggregationError, match="staleness"):
        buf.offer(d, 1, -1)

    assert buf.pending == 0
    assert buf.stats()["buffered"] == 0


def test_flush_of_an_empty_buffer_raises_and_the_buffer_still_works() -> None:
    buf = AsyncBuffer(make_strategy("fedavg"), SPEC, buffer_size=1)

    with pytest.raises(AggregationError, match="no updates"):
        buf.flush(zeros())
    buf.offer(deltas(1, seed=4)[0], 1, 0)

    assert buf.ready


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"buffer_size": 0}, "buffer_size"), ({"max_staleness": -1}, "max_staleness")],
)
def test_bad_buffer_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AsyncBuffer(make_strategy("fedavg"), SPEC, **kwargs)
