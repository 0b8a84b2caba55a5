"""Differential privacy: clipping, noise, DP-FedAvg, and the accountant's epsilons."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from aggregator.strategies.dp_fedavg import (
    DPFedAvg,
    DPFedAvgOptions,
    NoisyClippedSum,
    clip_update,
    epsilon_spent,
    l2_norm,
    noise_multiplier_for,
)
from edge_agent.privacy import LocalDP, local_epsilon, local_noise_multiplier
from fedge.errors import AggregationError

SPEC = {"w": (3, 4), "b": (4,)}


def _delta(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in SPEC.items()}


def _flat(d: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(d[k], dtype=np.float64).ravel() for k in sorted(d)])


def _exact_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Balle & Wang (2018), Theorem 8: the exact epsilon of one Gaussian mechanism with
    sensitivity 1 and noise ``sigma``, by solving its delta(epsilon) for the given delta."""

    def delta_of(eps: float) -> float:
        return norm.cdf(0.5 / sigma - eps * sigma) - math.exp(eps) * norm.cdf(
            -0.5 / sigma - eps * sigma
        )

    return float(brentq(lambda e: delta_of(e) - delta, 0.0, 500.0))


# --- clipping ---------------------------------------------------------------------------------


def test_l2_norm_is_the_norm_of_all_tensors() -> None:
    d = _delta(0)
    assert l2_norm(d) == pytest.approx(float(np.linalg.norm(_flat(d))), rel=1e-12)


@pytest.mark.parametrize("module", ["aggregator", "edge_agent"])
def test_clip_scales_down_and_keeps_direction(module: str) -> None:
    from aggregator.strategies.dp_fedavg import clip_update as agg_clip
    from edge_agent.privacy import clip_update as dev_clip

    clip = agg_clip if module == "aggregator" else dev_clip
    # Prepare
    d = _delta(1, scale=10.0)
    before = _flat(d)
    # Execute
    clipped, n = clip(d, 1.5)
    # Assert
    after = _flat(clipped)
    assert n == pytest.approx(np.linalg.norm(before))
    assert np.linalg.norm(after) == pytest.approx(1.5)
    np.testing.assert_allclose(after, before * (1.5 / np.linalg.norm(before)), rtol=1e-12)


def test_clip_leaves_small_updates_alone() -> None:
    d = _delta(2, scale=0.01)
    clipped, _ = clip_update(d, 10.0)
    np.testing.assert_array_equal(_flat(clipped), _flat(d))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_clip_refuses_non_finite(bad: float) -> None:
    d = _delta(3)
    d["b"][1] = bad
    with pytest.raises(ValueError, match="non-finite"):
        clip_update(d, 1.0)
    with pytest.raises(ValueError, match="non-finite"):
        LocalDP(1.0, 0.0).privatize(d)


def test_clip_of_huge_float32_does_not_overflow() -> None:
    # float32 squares of 3e38 overflow to inf; the norm is computed in float64.
    d = {"w": np.full((2, 2), 3e38, dtype=np.float32)}
    clipped, n = clip_update(d, 1.0)
    assert n == pytest.approx(6e38, rel=1e-6)
    np.testing.assert_allclose(clipped["w"], np.full((2, 2), 0.5), rtol=1e-6)


# --- the noisy sum and DP-FedAvg ----------------------------------------------------------------


def test_noisy_clipped_sum_without_noise_is_the_sum_of_clipped() -> None:
    # Prepare
    deltas = [_delta(s, scale=float(s)) for s in range(1, 5)]
    expected = sum(_flat(d) * min(1.0, 2.0 / np.linalg.norm(_flat(d))) for d in deltas)
    acc = NoisyClippedSum(SPEC, clip_norm=2.0)
    # Execute
    for d in deltas:
        acc.add(d)
    got = acc.release(0.0, np.random.default_rng(0))
    # Assert
    np.testing.assert_allclose(_flat(got), expected, rtol=1e-12)
    assert acc.count == 4
    assert acc.clipped == sum(np.linalg.norm(_flat(d)) > 2.0 for d in deltas)


def test_noise_has_the_requested_std() -> None:
    acc = NoisyClippedSum({"w": (400, 500)}, clip_norm=1.0)
    out = acc.release(0.7, np.random.default_rng(1))["w"]
    # 200,000 draws: the sample std is within 1 % of 0.7 with overwhelming probability.
    assert float(out.std()) == pytest.approx(0.7, rel=0.01)
    assert abs(float(out.mean())) < 0.01


def _dp(rng_seed: int | None = None, **options: object) -> DPFedAvg:
    rng = None if rng_seed is None else np.random.default_rng(rng_seed)
    return DPFedAvg(DPFedAvgOptions(**options), rng=rng)  # type: ignore[arg-type]


def test_dp_fedavg_weighs_devices_equally_and_divides_by_expected() -> None:
    # Prepare: no noise, a clip that does not bind
    weights = {k: np.ones(s, dtype=np.float32) for k, s in SPEC.items()}
    a, b = _delta(10), _delta(11)
    strategy = _dp(clip_norm=100.0, noise_multiplier=1e-12, expected_devices=4, server_lr=0.5)
    strategy.begin_round(SPEC)
    # Execute: wildly different sample counts must not change the weights
    strategy.fold(a, 1)
    strategy.fold(b, 1_000_000)
    new = strategy.finish(weights)
    # Assert
    expected = _flat(weights) + 0.5 * (_flat(a) + _flat(b)) / 4
    np.testing.assert_allclose(_flat(new), expected, rtol=1e-6)
    assert all(v.dtype == np.float32 for v in new.values())


def test_dp_fedavg_clips_each_update() -> None:
    weights = {k: np.zeros(s, dtype=np.float32) for k, s in SPEC.items()}
    big = _delta(12, scale=100.0)
    strategy = _dp(clip_norm=2.0, noise_multiplier=1e-12, expected_devices=1)
    strategy.begin_round(SPEC)
    strategy.fold(big, 1)
    new = strategy.finish(weights)
    expected = _flat(big) * (2.0 / np.linalg.norm(_flat(big)))
    np.testing.assert_allclose(_flat(new), expected, rtol=1e-5)
    assert strategy.round_metrics()["dp_clipped"] == 1.0


def test_dp_fedavg_refuses_nan() -> None:
    strategy = _dp()
    strategy.begin_round(SPEC)
    bad = _delta(13)
    bad["w"][0, 0] = np.nan
    with pytest.raises(AggregationError):
        strategy.fold(bad, 1)
    assert strategy.count == 0


def test_dp_fedavg_noise_scale_is_z_times_clip_over_expected() -> None:
    zeros = {"w": np.zeros((300, 300), dtype=np.float32)}
    strategy = _dp(2, clip_norm=0.5, noise_multiplier=2.0, expected_devices=10)
    strategy.begin_round({"w": (300, 300)})
    strategy.fold(zeros, 1)
    new = strategy.finish(zeros)
    assert float(new["w"].std()) == pytest.approx(2.0 * 0.5 / 10, rel=0.01)


def test_dp_fedavg_stops_at_the_planned_budget() -> None:
    # Prepare
    strategy = _dp(3, target_epsilon=4.0, rounds=2, expected_devices=2, noise_multiplier=0.1)
    weights = {k: np.zeros(s, dtype=np.float32) for k, s in SPEC.items()}
    epsilons = []
    # Execute
    for seed in range(2):
        strategy.begin_round(SPEC)
        strategy.fold(_delta(seed), 1)
        weights = strategy.finish(weights)
        epsilons.append(strategy.round_metrics()["dp_epsilon"])
    strategy.begin_round(SPEC)
    strategy.fold(_delta(9), 1)
    # Assert
    with pytest.raises(AggregationError, match="privacy budget spent"):
        strategy.finish(weights)
    assert strategy.exhausted
    assert 0 < epsilons[0] < epsilons[1] <= 4.0
    assert epsilons[1] == pytest.approx(epsilon_spent(strategy.noise_multiplier, 2, 1e-5))
    assert strategy.noise_multiplier == pytest.approx(noise_multiplier_for(4.0, 1e-5, 2))


def test_dp_fedavg_resumes_its_accountant_from_state() -> None:
    # Prepare: a strategy that released 3 rounds
    first = _dp(4, noise_multiplier=1.5, expected_devices=1)
    weights = {k: np.zeros(s, dtype=np.float32) for k, s in SPEC.items()}
    for seed in range(3):
        first.begin_round(SPEC)
        first.fold(_delta(seed), 1)
        first.finish(weights)
    # Execute
    resumed = _dp(noise_multiplier=1.5, expected_devices=1)
    resumed.load_state_dict(first.state_dict())
    # Assert
    assert _dp(noise_multiplier=1.5).epsilon == 0.0
    assert DPFedAvg().noise_multiplier == 1.0  # the defaults are a valid configuration
    assert resumed.rounds_done == 3
    assert resumed.epsilon == pytest.approx(epsilon_spent(1.5, 3, 1e-5))


@pytest.mark.parametrize(
    "options",
    [
        {"clip_norm": 0.0},
        {"noise_multiplier": 0.0},  # and no target
        {"target_epsilon": 1.0},  # a target needs rounds
        {"expected_devices": 0},
        {"delta": 0.0},
        {"accountant": "moments"},
    ],
)
def test_dp_options_refuse_what_gives_no_guarantee(options: dict) -> None:
    base: dict = {"noise_multiplier": 1.0} | options
    with pytest.raises(ValueError):  # noqa: PT011
        DPFedAvgOptions(**base)


# --- the accountant -----------------------------------------------------------------------------


def test_epsilon_of_one_round_brackets_the_exact_gaussian() -> None:
    # Prepare: one Gaussian mechanism, noise multiplier 2, delta 1e-5
    exact = _exact_gaussian_epsilon(2.0, 1e-5)
    # RDP of a Gaussian is alpha / (2 z^2); the classic conversion is an upper bound of RDP's.
    classic = min(a / 8.0 + math.log(1e5) / (a - 1) for a in np.linspace(1.01, 200, 20000))
    # Execute
    rdp = epsilon_spent(2.0, 1, 1e-5, accountant="rdp")
    pld = epsilon_spent(2.0, 1, 1e-5, accountant="pld")
    # Assert: RDP is a valid (conservative) bound; PLD is close to exact
    assert exact <= rdp <= classic
    assert pld == pytest.approx(exact, rel=0.02)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise_and_sampling() -> None:
    assert epsilon_spent(1.0, 0, 1e-5) == 0.0
    assert epsilon_spent(1.0, 10, 1e-5) < epsilon_spent(1.0, 20, 1e-5)
    assert epsilon_spent(2.0, 10, 1e-5) < epsilon_spent(1.0, 10, 1e-5)
    assert epsilon_spent(1.0, 10, 1e-5, sampling_rate=0.1) < epsilon_spent(1.0, 10, 1e-5)
    assert epsilon_spent(0.0, 1, 1e-5) == math.inf


@pytest.mark.parametrize(("target", "rounds"), [(1.0, 10), (8.0, 30), (0.5, 1)])
def test_noise_multiplier_for_is_tight(target: float, rounds: int) -> None:
    z = noise_multiplier_for(target, 1e-5, rounds)
    assert epsilon_spent(z, rounds, 1e-5) <= target
    assert epsilon_spent(z * 0.99, rounds, 1e-5) > target


@pytest.mark.parametrize(
    "kwargs",
    [
        {"delta": 0.0},
        {"delta": 1.0},
        {"sampling_rate": 0.0},
        {"sampling_rate": 1.5},
        {"accountant": "moments"},
    ],
)
def test_accountant_rejects_bad_parameters(kwargs: dict) -> None:
    args = {"noise_multiplier": 1.0, "rounds": 1, "delta": 1e-5} | kwargs
    with pytest.raises(ValueError):  # noqa: PT011
        epsilon_spent(**args)


# --- local DP -----------------------------------------------------------------------------------


def test_local_dp_without_noise_is_clipping_in_the_original_dtype() -> None:
    d = _delta(4, scale=5.0)
    out = LocalDP(clip_norm=1.0, noise_multiplier=0.0).privatize(d)
    assert all(out[k].dtype == np.float32 for k in SPEC)
    assert l2_norm(out) == pytest.approx(1.0, rel=1e-6)


def test_local_dp_noise_std() -> None:
    d = {"w": np.zeros((400, 500), dtype=np.float32)}
    out = LocalDP(clip_norm=0.2, noise_multiplier=3.0).privatize(d, np.random.default_rng(5))
    assert float(out["w"].std()) == pytest.approx(0.6, rel=0.01)


def test_local_epsilon_uses_twice_the_clip_as_sensitivity() -> None:
    # Noise z*C against sensitivity 2C is a Gaussian mechanism with multiplier z/2.
    assert local_epsilon(3.0, 5) == pytest.approx(epsilon_spent(1.5, 5, 1e-5))
    assert LocalDP(1.0, 3.0).epsilon(5) == local_epsilon(3.0, 5)


def test_local_noise_multiplier_meets_the_target() -> None:
    z = local_noise_multiplier(5.0, 10)
    assert local_epsilon(z, 10) <= 5.0
    assert local_epsilon(z * 0.99, 10) > 5.0
