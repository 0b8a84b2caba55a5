"""Every strategy against an independently computed expectation (numpy loops, hand values)."""

from __future__ import annotations

import dataclasses
import math
import tracemalloc

import numpy as np
import pytest
from scipy.stats import trim_mean

from aggregator.strategies import STRATEGIES, describe_strategies, make_strategy, update_norm
from aggregator.strategies.accumulator import WeightedSum
from fedge.clipping import clip_scale
from fedge.envelopes import TrainHyper
from fedge.errors import AggregationError, InvalidValue

SPEC = {"fc1.weight": (4, 3), "fc1.bias": (4,), "empty": (0, 2)}
# dp-fedavg adds noise and clips by design: tests/unit/test_privacy.py covers it.
ALL = sorted(n for n in STRATEGIES if n != "dp-fedavg")
ROBUST = ["median", "trimmed_mean", "krum", "multikrum"]
LINEAR = [n for n in ALL if n not in ROBUST]
Arrays = dict[str, np.ndarray]


def updates(n: int, seed: int, spec: dict[str, tuple[int, ...]] = SPEC) -> list[Arrays]:
    rng = np.random.default_rng(seed)
    return [
        {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in spec.items()}
        for _ in range(n)
    ]


def zeros(spec: dict[str, tuple[int, ...]] = SPEC) -> Arrays:
    return {k: np.zeros(s, np.float32) for k, s in spec.items()}


def run_round(strategy, weights: Arrays, deltas: list[Arrays], samples: list[int]) -> Arrays:
    strategy.begin_round({k: v.shape for k, v in weights.items()})
    for d, n in zip(deltas, samples, strict=True):
        strategy.fold(d, n)
    return strategy.finish(weights)


def wmean(deltas: list[Arrays], samples: list[int], k: str) -> np.ndarray:
    """Reference weighted mean, an explicit float64 loop."""
    acc = np.zeros(deltas[0][k].shape, np.float64)
    for d, n in zip(deltas, samples, strict=True):
        acc += n * d[k].astype(np.float64)
    return acc / sum(samples)


def assert_close(a: Arrays, b: dict[str, np.ndarray], rtol: float = 1e-5) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == np.float32
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=1e-6, err_msg=k)


# --- linear strategies ---------------------------------------------------------------------


@pytest.mark.parametrize("accumulate", ["float32", "float64"])
@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_fedavg_and_fedprox_apply_the_weighted_mean(name: str, accumulate: str) -> None:
    deltas, samples = updates(6, seed=1), [10, 200, 3, 50, 7, 1000]
    w0 = {k: v + 1.0 for k, v in updates(1, seed=2)[0].items()}
    strategy = make_strategy(name, {"server_lr": "0.5", "accumulate": accumulate})

    out = run_round(strategy, w0, deltas, samples)

    assert_close(out, {k: w0[k] + 0.5 * wmean(deltas, samples, k) for k in SPEC})


def test_fedprox_asks_devices_for_its_mu_and_keeps_the_rest() -> None:
    base = TrainHyper(epochs=3, batch_size=16, lr=0.2, momentum=0.5, weight_decay=1e-4)

    overrides = make_strategy("fedprox", {"mu": "1"}).hyper_overrides()
    hyper = dataclasses.replace(base, **overrides)

    assert hyper == TrainHyper(3, 16, 0.2, 0.5, 1e-4, prox_mu=1.0)
    assert make_strategy("fedavg").hyper_overrides() == {}


def test_fedavgm_momentum_over_three_rounds() -> None:
    strategy = make_strategy("fedavgm", {"server_lr": "0.5", "momentum": "0.8"})
    w = zeros()
    ref_w = {k: np.zeros(s) for k, s in SPEC.items()}
    ref_v = {k: np.zeros(s) for k, s in SPEC.items()}

    for r in range(3):
        deltas, samples = updates(4, seed=10 + r), [1, 2, 3, 4]
        w = run_round(strategy, w, deltas, samples)
        for k in SPEC:
            ref_v[k] = 0.8 * ref_v[k] + wmean(deltas, samples, k)
            ref_w[k] = ref_w[k] + 0.5 * ref_v[k]
        assert_close(w, ref_w)


def test_fedavgm_default_effective_rate_is_one() -> None:
    strategy = make_strategy("fedavgm")

    assert strategy.server_lr / (1 - strategy.options.momentum) == pytest.approx(1.0)


def reference_fedopt(name: str, rounds: list[tuple[list[Arrays], list[int]]], o: dict) -> Arrays:
    """Reddi et al. 2021, Algorithm 2, in float64: m_-1 = 0, v_-1 = tau^2, no bias correction."""
    eta, tau, b1, b2 = o["server_lr"], o["tau"], o["beta1"], o.get("beta2", 0.0)
    w = {k: np.zeros(s) for k, s in SPEC.items()}
    m = {k: np.zeros(s) for k, s in SPEC.items()}
    v = {k: np.full(s, tau**2) for k, s in SPEC.items()}
    for deltas, samples in rounds:
        for k in SPEC:
            d = wmean(deltas, samples, k)
            m[k] = b1 * m[k] + (1 - b1) * d
            if name == "fedadam":
                v[k] = b2 * v[k] + (1 - b2) * d**2
            elif name == "fedyogi":
                v[k] = v[k] - (1 - b2) * d**2 * np.sign(v[k] - d**2)
            else:
                v[k] = v[k] + d**2
            w[k] = w[k] + eta * m[k] / (np.sqrt(v[k]) + tau)
    return w


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_server_optimizers_over_four_rounds(name: str) -> None:
    opts = {"server_lr": 0.05, "tau": 0.01, "beta1": 0.8}
    if name != "fedadagrad":
        opts["beta2"] = 0.9
    strategy = make_strategy(name, {k: str(v) for k, v in opts.items()})
    rounds = [(updates(3, seed=20 + r), [5, 1, 9]) for r in range(4)]
    w = zeros()

    for i, (deltas, samples) in enumerate(rounds):
        w = run_round(strategy, w, deltas, samples)
        assert_close(w, reference_fedopt(name, rounds[: i + 1], opts), rtol=2e-5)
    assert strategy.t == 4


def test_fedadam_first_step_by_hand() -> None:
    # Defaults eta=1e-2, tau=1e-3, beta1=0.9, beta2=0.99 and one update d = 0.1:
    # m = 0.1 * 0.1 = 0.01; v = 0.99 * 1e-6 + 0.01 * 0.01 = 1.0099e-4; sqrt(v) = 0.0100494
    # w = 0.01 * 0.01 / (0.0100494 + 0.001) = 0.00905027
    strategy = make_strategy("fedadam")

    out = run_round(strategy, {"w": np.zeros(1, np.float32)}, [{"w": np.array([0.1])}], [7])

    np.testing.assert_allclose(out["w"], [0.00905027], rtol=1e-5)


def test_adaptive_defaults_are_reddi_et_al() -> None:
    o = make_strategy("fedyogi").options

    assert (o.server_lr, o.tau, o.beta1, o.beta2) == (1e-2, 1e-3, 0.9, 0.99)


# --- robust strategies ---------------------------------------------------------------------


def test_median_by_hand() -> None:
    deltas = [{"w": np.array([1.0, -4.0])}, {"w": np.array([2.0, 0.0])}]
    deltas += [{"w": np.array([3.0, 1.0])}, {"w": np.array([100.0, 2.0])}]

    out = run_round(make_strategy("median"), {"w": np.ones(2, np.float32)}, deltas, [1, 1, 1, 999])

    np.testing.assert_allclose(out["w"], [1 + 2.5, 1 + 0.5])


def test_median_is_coordinate_wise_and_ignores_sample_counts() -> None:
    deltas = updates(7, seed=3)

    out = run_round(make_strategy("median"), zeros(), deltas, [1, 10, 100, 1000, 1, 1, 5])

    assert_close(out, {k: np.median(np.stack([d[k] for d in deltas]), axis=0) for k in SPEC})


@pytest.mark.parametrize(("beta", "n"), [(0.1, 10), (0.2, 7), (0.0, 4), (0.34, 3)])
def test_trimmed_mean_is_scipy_trim_mean(beta: float, n: int) -> None:
    deltas = updates(n, seed=4)

    out = run_round(make_strategy("trimmed_mean", {"beta": str(beta)}), zeros(), deltas, [1] * n)

    want = {k: trim_mean(np.stack([d[k] for d in deltas]), beta, axis=0) for k in SPEC}
    assert_close(out, want)


def test_krum_and_multikrum_by_hand() -> None:
    # 1-D updates 0, 0.1, 0.25, 0.3, 10 with f = 1: each score sums the squared distances to
    # the n - f - 2 = 2 nearest others: 0.0725, 0.0325, 0.025, 0.0425, 94.0325 + 93.0625.
    deltas = [{"w": np.array([x], np.float32)} for x in (0.0, 0.1, 0.25, 0.3, 10.0)]
    w0 = {"w": np.zeros(1, np.float32)}
    krum = make_strategy("krum", {"f": "1"})
    multi = make_strategy("multikrum", {"f": "1", "m": "3"})

    one = run_round(krum, w0, deltas, [1] * 5)
    three = run_round(multi, w0, deltas, [1] * 5)

    np.testing.assert_allclose(one["w"], [0.25])
    assert krum.last_selected == (2,)
    np.testing.assert_allclose(three["w"], [(0.25 + 0.1 + 0.3) / 3])
    assert sorted(multi.last_selected) == [1, 2, 3]


def reference_krum_scores(deltas: list[Arrays], f: int) -> list[float]:
    flat = [np.concatenate([d[k].astype(np.float64).ravel() for k in SPEC]) for d in deltas]
    scores = []
    for i, x in enumerate(flat):
        dists = sorted(float(((x - y) ** 2).sum()) for j, y in enumerate(flat) if j != i)
        scores.append(sum(dists[: len(flat) - f - 2]))
    return scores


@pytest.mark.parametrize("m", [0, 1, 4])
def test_multikrum_matches_brute_force(m: int) -> None:
    deltas = updates(9, seed=5)
    scores = reference_krum_scores(deltas, f=2)
    keep = np.argsort(scores)[: m or 9 - 2]

    out = run_round(make_strategy("multikrum", {"f": "2", "m": str(m)}), zeros(), deltas, [1] * 9)

    want = {k: np.mean([deltas[i][k].astype(np.float64) for i in keep], axis=0) for k in SPEC}
    assert_close(out, want)


def test_krum_needs_2f_plus_3_updates() -> None:
    strategy = make_strategy("krum", {"f": "2"})

    with pytest.raises(AggregationError, match="6 updates, needs at least 7"):
        run_round(strategy, zeros(), updates(6, seed=0), [1] * 6)
    assert strategy.min_updates == 7
    assert make_strategy("median").min_updates == 1


def test_finish_refuses_weights_of_another_model() -> None:
    strategy = make_strategy("fedavg")
    strategy.begin_round(SPEC)
    strategy.fold(updates(1, seed=0)[0], 1)

    with pytest.raises(AggregationError, match="weights"):
        strategy.finish({"other": np.zeros(3, np.float32)})


@pytest.mark.parametrize("name", ROBUST)
def test_robust_strategies_stay_within_honest_bounds_under_a_x100_update(name: str) -> None:
    honest = updates(9, seed=6)
    attacker = {k: 100.0 * v for k, v in updates(1, seed=7)[0].items()}
    deltas = [*honest[:4], attacker, *honest[4:]]
    w0 = zeros()

    out = run_round(
        make_strategy(name, {"f": "1"} if "krum" in name else None), w0, deltas, [1] * 10
    )
    plain = run_round(make_strategy("fedavg"), w0, deltas, [1] * 10)

    for k in SPEC:
        lo = np.min([h[k] for h in honest], axis=0)
        hi = np.max([h[k] for h in honest], axis=0)
        assert np.all((out[k] >= lo - 1e-7) & (out[k] <= hi + 1e-7)), k
        if out[k].size:  # the same attack drags plain FedAvg out of the honest range
            assert np.any((plain[k] < lo) | (plain[k] > hi)), k


def test_robust_strategies_flag_that_they_need_all_updates() -> None:
    assert {n for n, c in STRATEGIES.items() if c.needs_all_updates} == set(ROBUST)


def test_robust_memory_grows_with_updates_and_streaming_does_not() -> None:
    spec = {"w": (100, 100)}
    model_bytes = 100 * 100 * 4
    retained = {}
    for name in ("median", "fedadam"):
        strategy = make_strategy(name)
        strategy.begin_round(spec)
        deltas = updates(50, seed=8, spec=spec)
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            for d in deltas:
                strategy.fold(d, 3)
            retained[name] = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()

    assert retained["median"] >= 50 * model_bytes
    assert retained["fedadam"] < model_bytes


# --- the float32 accumulator's two paths ---------------------------------------------------

BIG = {"w": (300, 500), "b": (7,)}  # 150 k elements: three 64 k slabs on the streamed path


@pytest.mark.parametrize("streamed", [False, True])
def test_float32_accumulator_paths_match_a_float64_loop(streamed: bool) -> None:
    deltas, samples = updates(5, seed=50, spec=BIG), [3, 1, 4, 1, 5]
    acc = WeightedSum(BIG, np.float32, full_scratch_max=0 if streamed else 10**9)

    for d, n in zip(deltas, samples, strict=True):
        acc.add(d, float(n), scale=0.5)
    mean = acc.mean()

    assert acc._streamed is streamed
    assert acc._flat_scratch.nbytes == (4 * 65536 if streamed else 4 * (150_000 + 7))
    for k in BIG:
        np.testing.assert_allclose(mean[k], 0.5 * wmean(deltas, samples, k), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("bad", [math.nan, math.inf, "overflow"])
def test_float32_accumulator_refuses_before_touching_the_sum(streamed: bool, bad: object) -> None:
    good = updates(1, seed=51, spec=BIG)[0]
    poisoned = {k: v.copy() for k, v in good.items()}
    if bad == "overflow":
        poisoned["w"][299, 499] = 3e38  # finite, but not once weighted by 10
    else:
        poisoned["w"][299, 499] = bad  # in the last slab: earlier slabs must not be added
    acc = WeightedSum(BIG, np.float32, full_scratch_max=0 if streamed else 10**9)
    acc.add(good, 10.0)
    before = {k: v.copy() for k, v in acc.sums.items()}

    with pytest.raises(AggregationError, match=r"finite|NaN"):
        acc.add(poisoned, 10.0)

    assert (acc.count, acc.total_weight) == (1, 10.0)
    for k in BIG:
        np.testing.assert_array_equal(acc.sums[k], before[k])


# --- norm bounding and finiteness ------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_clip_norm_scales_each_update_to_at_most_c(name: str) -> None:
    deltas = updates(5, seed=9)
    deltas[2] = {k: 50.0 * v for k, v in deltas[2].items()}
    norms = [
        math.sqrt(sum(float((d[k].astype(np.float64) ** 2).sum()) for k in SPEC)) for d in deltas
    ]
    c = float(np.median(norms))
    clipped = [
        {k: d[k] * min(1.0, c / nm) for k in SPEC} for d, nm in zip(deltas, norms, strict=True)
    ]
    opts = {"clip_norm": str(c), **({"f": "1"} if "krum" in name else {})}

    out = run_round(make_strategy(name, opts), zeros(), deltas, [3, 1, 4, 1, 5])
    want = run_round(
        make_strategy(name, {k: v for k, v in opts.items() if k != "clip_norm"}),
        zeros(),
        clipped,
        [3, 1, 4, 1, 5],
    )

    assert_close(out, want)


def test_update_norm_is_the_l2_norm_of_all_tensors() -> None:
    d = {"a": np.array([3.0], np.float32), "b": np.array([[4.0, 12.0]], np.float32)}

    assert update_norm(d) == pytest.approx(13.0)


def test_update_norm_of_huge_finite_values_is_finite() -> None:
    # Squares overflow float32 (max ~3.4e38); the norm falls back to float64.
    d = {"a": np.full(4, 1e30, np.float32)}

    assert update_norm(d) == pytest.approx(2e30, rel=1e-6)


def test_clip_scale_bounds_the_norm_and_leaves_short_updates_alone() -> None:
    d = {"a": np.array([3.0], np.float32), "b": np.array([[4.0, 12.0]], np.float32)}

    assert clip_scale(d, 6.5) == pytest.approx(0.5)
    assert clip_scale(d, 13.0) == 1.0
    assert clip_scale(d, 100.0) == 1.0


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_clip_scale_refuses_non_finite_updates(bad: float) -> None:
    d = {"a": np.array([1.0, bad], np.float32)}

    with pytest.raises(AggregationError, match="NaN or Inf"):
        clip_scale(d, 1.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("clip", ["0", "1.0"])
@pytest.mark.parametrize("name", ALL)
def test_non_finite_update_is_refused_and_leaves_the_round_unchanged(
    name: str, clip: str, bad: float
) -> None:
    deltas = updates(5, seed=11)
    poisoned = {k: v.copy() for k, v in deltas[0].items()}
    poisoned["fc1.weight"][1, 2] = bad
    opts = {"clip_norm": clip, **({"f": "1"} if "krum" in name else {})}
    strategy = make_strategy(name, opts)
    strategy.begin_round(SPEC)
    for d in deltas[:3]:
        strategy.fold(d, 2)

    with pytest.raises(AggregationError, match=r"NaN|Inf|finite"):
        strategy.fold(poisoned, 2)
    for d in deltas[3:]:
        strategy.fold(d, 2)
    out = strategy.finish(zeros())

    assert strategy.count == 5
    assert_close(out, run_round(make_strategy(name, opts), zeros(), deltas, [2] * 5))


def test_huge_finite_update_is_clipped_not_refused() -> None:
    huge = {k: np.full(s, 1e30, np.float32) for k, s in SPEC.items()}
    strategy = make_strategy("fedavg", {"clip_norm": "2"})

    out = run_round(strategy, zeros(), [huge], [1])

    assert update_norm(out) == pytest.approx(2.0, rel=1e-5)


def test_overflowing_round_does_not_advance_optimizer_state() -> None:
    strategy = make_strategy("fedavgm")
    big = {"w": np.full(3, 3e38, np.float32)}

    out = run_round(strategy, {"w": np.zeros(3, np.float32)}, [big, big], [1, 1])

    assert not np.isfinite(out["w"]).all()
    assert strategy.velocity is None


@pytest.mark.parametrize("name", ALL)
def test_fold_checks_order_and_arguments(name: str) -> None:
    strategy = make_strategy(name)
    d = updates(1, seed=0)[0]

    with pytest.raises(AggregationError, match="begin_round"):
        strategy.fold(d, 1)
    strategy.begin_round(SPEC)
    with pytest.raises(AggregationError, match="num_samples"):
        strategy.fold(d, 0)
    with pytest.raises(AggregationError, match="num_samples"):
        strategy.fold(d, True)
    with pytest.raises(AggregationError, match="staleness"):
        strategy.fold(d, 1, staleness=-1)
    with pytest.raises(AggregationError, match="shape"):
        strategy.fold({**d, "fc1.bias": np.zeros(5, np.float32)}, 1)
    with pytest.raises(AggregationError, match="no updates"):
        strategy.finish(zeros())
    assert strategy.count == 0


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_staleness_weight_scales_the_delta_not_the_sample_weight(name: str) -> None:
    deltas, samples, stale = updates(3, seed=12), [4, 2, 6], [0, 3, 8]
    strategy = make_strategy(name)
    strategy.set_staleness_weight(lambda s: 1.0 / math.sqrt(1 + s))
    strategy.begin_round(SPEC)
    for d, n, s in zip(deltas, samples, stale, strict=True):
        strategy.fold(d, n, staleness=s)
    out = strategy.finish(zeros())

    want = {
        k: sum(
            n * d[k].astype(np.float64) / math.sqrt(1 + s)
            for d, n, s in zip(deltas, samples, stale, strict=True)
        )
        / 12
        for k in SPEC
    }
    assert_close(out, want)


# --- state across restarts -----------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_state_dict_round_trip_mid_training_gives_identical_next_steps(name: str) -> None:
    opts = {"f": "1"} if "krum" in name else None
    a = make_strategy(name, opts)
    w = zeros()
    for r in range(2):
        w = run_round(a, w, updates(5, seed=30 + r), [1, 2, 3, 4, 5])
    state = a.state_dict()
    b = make_strategy(name, opts)

    b.load_state_dict({k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in state.items()})
    next_a = run_round(a, w, updates(5, seed=40), [1, 2, 3, 4, 5])
    next_b = run_round(b, w, updates(5, seed=40), [1, 2, 3, 4, 5])

    assert all(isinstance(v, np.ndarray | float | int) for v in state.values())
    for k in SPEC:
        np.testing.assert_array_equal(next_a[k], next_b[k])
    assert a.state_dict().keys() == b.state_dict().keys()


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_state_dict_of_an_optimizer_is_not_empty_and_a_fresh_one_differs(name: str) -> None:
    a = make_strategy(name)
    w = run_round(a, zeros(), updates(3, seed=1), [1, 1, 1])
    fresh = make_strategy(name)

    after_a = run_round(a, w, updates(3, seed=2), [1, 1, 1])
    after_fresh = run_round(fresh, w, updates(3, seed=2), [1, 1, 1])

    assert any(isinstance(v, np.ndarray) for v in a.state_dict().values())
    assert not np.array_equal(after_a["fc1.weight"], after_fresh["fc1.weight"])


@pytest.mark.parametrize(
    ("name", "state", "match"),
    [
        ("fedadam", {"server_lr": 0.01, "t": -1}, "t must be"),
        ("fedadam", {"server_lr": 0.01, "t": 2}, "same tensors"),
        ("fedadam", {"server_lr": 0.01, "t": 1, "m/w": np.zeros(2), "v/w": -np.ones(2)}, "v must"),
        ("fedavgm", {"server_lr": 0.1, "velocity/w": np.array([np.nan])}, "not finite"),
        ("fedavg", {"server_lr": "fast"}, "server_lr"),
        ("fedavg", {}, "server_lr"),
    ],
)
def test_load_state_dict_refuses_bad_state(name: str, state: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_strategy(name).load_state_dict(state)


def test_restored_state_of_another_model_is_refused_at_begin_round() -> None:
    a = make_strategy("fedadam")
    run_round(a, zeros(), updates(2, seed=0), [1, 1])
    b = make_strategy("fedadam")
    b.load_state_dict(a.state_dict())

    with pytest.raises(AggregationError, match="shapes changed"):
        b.begin_round({"other": (3,)})


# --- construction from KEY=VALUE options ----------------------------------------------------


def test_make_strategy_converts_typed_options() -> None:
    s = make_strategy(
        " FedAdam ", {"tau": "1e-4", "beta1": "0", "clip-norm": "5", "server_lr": "0.1"}
    )

    assert (s.name, s.options.tau, s.options.beta1, s.options.clip_norm, s.server_lr) == (
        "fedadam",
        1e-4,
        0.0,
        5.0,
        0.1,
    )


def test_server_lr_keyword_is_a_default_that_an_option_overrides() -> None:
    assert make_strategy("fedadam").server_lr == 1e-2
    assert make_strategy("fedadam", server_lr=0.3).server_lr == 0.3
    assert make_strategy("fedadam", {"server_lr": "0.2"}, server_lr=0.3).server_lr == 0.2
    assert make_strategy("fedavg", 0.5).server_lr == 0.5  # the old positional signature


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("fedsgd", None, "unknown strategy 'fedsgd'; choose one of: fedavg, fedavgm"),
        ("fedadam", {"beta": "0.9"}, "no option 'beta'; valid options .*beta1=0.9, beta2=0.99"),
        ("fedadam", {"tau": "small"}, "option tau must be a number, got 'small'"),
        ("fedadam", {"tau": "0"}, "tau must be > 0"),
        ("krum", {"f": "1.5"}, "option f must be an integer"),
        ("trimmed_mean", {"beta": "0.5"}, r"beta must be in \[0, 0.5\)"),
        ("fedavg", {"accumulate": "float16"}, "accumulate must be one of float32, float64"),
        ("fedavg", {"clip_norm": "-1"}, "clip_norm must be >= 0"),
        ("fedavg", {"server_lr": "nan"}, "finite"),
        ("fedavgm", {"momentum": "1"}, r"momentum must be in \[0, 1\)"),
    ],
)
def test_make_strategy_errors_say_what_to_write(
    name: str, options: dict | None, match: str
) -> None:
    with pytest.raises(InvalidValue, match=match):
        make_strategy(name, options)


def test_describe_strategies_lists_every_strategy_with_its_defaults() -> None:
    info = {i.name: i for i in describe_strategies()}

    assert sorted(info) == sorted(STRATEGIES)
    for name, entry in info.items():
        defaults = {f.name: f.default for f in dataclasses.fields(STRATEGIES[name].Options)}
        assert {o.key for o in entry.options} == set(defaults)
        assert all(o.help for o in entry.options)
        assert entry.summary
        # Every listed default parses back to the strategy's default options.
        rebuilt = make_strategy(name, {o.key: o.default for o in entry.options}).options
        assert rebuilt == STRATEGIES[name].Options()
    assert {o.key: o.default for o in info["fedadam"].options}["tau"] == "0.001"


def test_dp_fedavg_denominator_defaults_to_the_round_target_unless_set() -> None:
    defaulted = make_strategy("dp-fedavg", {}, target_devices=7)
    explicit = make_strategy("dp-fedavg", {"expected_devices": "3"}, target_devices=7)

    assert defaulted.options.expected_devices == 7  # type: ignore[attr-defined]
    assert explicit.options.expected_devices == 3  # type: ignore[attr-defined]
    assert make_strategy("fedavg", {}, target_devices=7).round_metrics() == {}


def test_only_linear_strategies_sum_linearly() -> None:
    linear = {n for n, cls in STRATEGIES.items() if cls.sums_linearly}

    assert linear == {"fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad"}


def test_set_server_lr_refuses_a_negative_or_infinite_rate() -> None:
    strategy = make_strategy("fedavg")
    strategy.set_server_lr(0.25)

    assert strategy.server_lr == 0.25
    for bad in (-1.0, math.inf):
        with pytest.raises(ValueError, match="server_lr"):
            strategy.set_server_lr(bad)


def test_strategies_import_only_numpy_the_stdlib_and_the_contracts_pure_helpers() -> None:
    import ast
    import sys
    from pathlib import Path

    import aggregator.strategies

    allowed = ("aggregator.strategies", "fedge.errors", "fedge.tensors", "fedge.clipping")
    allowed += ("numpy", "dp_accounting")  # the DP accountant, imported lazily by dp_fedavg
    folder = Path(aggregator.strategies.__file__).parent
    found = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {(path.name, a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                found.add((path.name, node.module or ""))

    outside = {
        (file, name)
        for file, name in found
        if name.split(".")[0] not in sys.stdlib_module_names
        and not any(name == a or name.startswith(a + ".") for a in allowed)
    }

    assert outside == set()
