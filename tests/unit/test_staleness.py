from __future__ import annotations

import numpy as np
import pytest

from aggregator.config import AggregatorConfig
from aggregator.rounds import OpenRound, RoundContext
from aggregator.strategies import Strategy, make_strategy
from aggregator.strategies.staleness import StalenessWeight
from fedge.envelopes import RoundTask, TrainHyper
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


# What FedBuff's service mode does with an update, piece by piece: the strategy folds it with
# the staleness weight (``set_staleness_weight``), the round context refuses rounds that left
# the window, ``OpenRound.record`` reports staleness, ``finish`` makes the version (these
# assertions tested a standalone ``AsyncBuffer`` before; the service never used it).


def async_strategy(name: str = "fedavg", opts: dict[str, str] | None = None) -> Strategy:
    strategy = make_strategy(name, opts or {})
    strategy.set_staleness_weight(StalenessWeight())
    strategy.begin_round(SPEC)
    return strategy


def task(round_id: int, base_version: int) -> RoundTask:
    return RoundTask(
        round=round_id, base_version=base_version, deadline=1.0, codec="fp32",
        hyper=TrainHyper(), nonce=bytes(16),
    )  # fmt: skip


def test_updates_are_weighted_by_staleness_and_the_record_reports_it() -> None:
    strategy = async_strategy()
    ds, samples, stale = deltas(3, seed=1), [10, 30, 60], [0, 3, 8]
    w0 = {k: v + 1 for k, v in zeros().items()}
    rnd = OpenRound(task(9, 8), 0.0)

    for i, (d, n, st) in enumerate(zip(ds, samples, stale, strict=True)):
        assert strategy.count == i
        strategy.fold(d, n, staleness=st)
        rnd.folded.append((f"dev{i}", 9 - st, f"u{i}", st))
    record = rnd.record()
    new = strategy.finish(w0)

    # sum_i n_i (1+s_i)^-1/2 delta_i / sum_i n_i, computed by hand weights 1, 1/2, 1/3.
    want = {k: 1 + (10 * ds[0][k] + 30 * 0.5 * ds[1][k] + 60 / 3 * ds[2][k]) / 100 for k in SPEC}
    for k in SPEC:
        np.testing.assert_allclose(new[k], want[k], rtol=1e-5)
    assert strategy.count == 3
    assert (record["devices"], record["staleness_max"]) == (3, 8)
    assert record["staleness_mean"] == pytest.approx(11 / 3)
    strategy.begin_round(SPEC)
    assert strategy.count == 0


def test_rounds_older_than_the_window_are_refused() -> None:
    # The service keeps rounds whose base version is within max_staleness (4 here) of the
    # model's (9): round 5 (base v5) and round 9 (base v9); round 4 (base v4) has left.
    window = {r: OpenRound(task(r, r), 0.0) for r in (5, 9)}
    ctx = RoundContext(window[9], version=9, spec=SPEC, sink=async_strategy(), window=window)
    d = deltas(3, seed=2)

    answered = [ctx.answered(r) for r in (5, 4, 9)]
    for delta, rnd in zip(d, answered, strict=True):
        if rnd is not None:
            ctx.sink.fold(delta, 5, staleness=ctx.staleness(rnd))
    new = ctx.sink.finish(zeros())  # type: ignore[attr-defined]

    assert [a is not None for a in answered] == [True, False, True]
    assert [ctx.staleness(a) for a in answered if a is not None] == [4, 0]
    for k in SPEC:
        np.testing.assert_allclose(new[k], (d[0][k] / np.sqrt(5) + d[2][k]) / 2, rtol=1e-5)


def test_a_server_optimizer_carries_across_async_versions() -> None:
    opts = {"server_lr": "0.1", "tau": "0.01", "beta1": "0.5", "beta2": "0.9"}
    buffered = make_strategy("fedadam", opts)
    buffered.set_staleness_weight(StalenessWeight("const"))
    sync = make_strategy("fedadam", opts)
    w_async = w_sync = zeros()

    for r in range(3):
        ds = deltas(2, seed=10 + r)
        buffered.begin_round(SPEC)
        for d in ds:
            buffered.fold(d, 4, staleness=r)
        w_async = buffered.finish(w_async)
        sync.begin_round(SPEC)
        for d in ds:
            sync.fold(d, 4)
        w_sync = sync.finish(w_sync)

    for k in SPEC:
        np.testing.assert_array_equal(w_async[k], w_sync[k])
    assert buffered.t == 3  # type: ignore[attr-defined]


def test_a_refused_update_leaves_the_version_in_progress_as_it_was() -> None:
    strategy = async_strategy("median")
    d = deltas(1, seed=3)[0]
    bad = {k: np.full(s, np.nan, np.float32) for k, s in SPEC.items()}

    with pytest.raises(AggregationError):
        strategy.fold(bad, 1, staleness=0)
    with pytest.raises(AggregationError, match="staleness"):
        strategy.fold(d, 1, staleness=-1)

    assert strategy.count == 0
    assert OpenRound(task(1, 0), 0.0).record()["devices"] == 0


def test_a_version_with_no_updates_raises_and_the_strategy_still_works() -> None:
    strategy = async_strategy()

    with pytest.raises(AggregationError, match="no updates"):
        strategy.finish(zeros())
    strategy.fold(deltas(1, seed=4)[0], 1, staleness=0)

    assert strategy.count == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"async_buffer": 0}, "async_buffer"), ({"max_staleness": -1}, "max_staleness")],
)
def test_bad_async_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AggregatorConfig.model_validate({"mode": "async", **kwargs})
