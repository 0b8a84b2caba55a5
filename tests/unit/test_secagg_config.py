"""``secure_aggregation:`` refuses, in one line, what cannot work on masked sums."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from aggregator.config import AggregatorConfig, SecureAggregationConfig
from aggregator.strategies import STRATEGIES
from fedge.errors import ConfigError
from simulation.fleet import SimConfig

LINEAR = ["fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad"]


def config(**kw: Any) -> AggregatorConfig:
    return AggregatorConfig(secure_aggregation=SecureAggregationConfig(), **kw)


@pytest.mark.parametrize("strategy", LINEAR)
def test_mean_only_strategies_are_allowed(strategy: str) -> None:
    assert config(strategy=strategy).secure_aggregation is not None


@pytest.mark.parametrize("strategy", sorted(set(STRATEGIES) - {*LINEAR, "dp-fedavg"}))
def test_strategies_needing_each_update_are_refused(strategy: str) -> None:
    with pytest.raises(ValidationError, match=f"strategy {strategy} needs each device's update"):
        config(strategy=strategy, min_devices=2, target_devices=10)


@pytest.mark.parametrize(
    ("kw", "says"),
    [
        ({"codec": "topk:0.05+int8"}, "sparsifies"),
        ({"strategy_opts": {"clip_norm": 1.0}}, "clip_norm"),
        ({"mode": "async"}, "mode: sync"),
        ({"int8": True}, "int8: false"),
        ({"round_timeout": 30}, "stage timeouts"),
    ],
)
def test_what_masked_sums_cannot_do_is_refused(kw: dict[str, Any], says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        config(**kw)


def test_dp_fedavg_adds_its_noise_to_the_secure_sum() -> None:
    c = config(strategy="dp-fedavg", strategy_opts={"clip_norm": 1.0})
    assert c.strategy == "dp-fedavg"


def test_dp_noise_scales_with_the_sensitivity_of_the_secure_sum() -> None:
    import numpy as np

    from aggregator.strategies.dp_fedavg import DPFedAvg, DPFedAvgOptions

    o = DPFedAvgOptions(clip_norm=1.0, noise_multiplier=1.0, expected_devices=5)
    s = DPFedAvg(o, rng=np.random.default_rng(0))
    s.begin_round({"w": (40_000,)})
    s.fold_clipped_sum({"w": np.zeros(40_000)}, 5, sensitivity=2.5)
    new = s.finish({"w": np.zeros(40_000, np.float32)})
    # The mean of 5 plus noise N(0, (z * 2.5)^2) / 5 on every coordinate.
    assert float(np.std(new["w"]) * 5) == pytest.approx(2.5, rel=0.03)
    assert s.round_metrics()["dp_sensitivity"] == 2.5
    assert s.count == 5


def test_ring_must_fit_32_bits() -> None:
    with pytest.raises(ValidationError, match="at most 32"):
        AggregatorConfig(
            secure_aggregation=SecureAggregationConfig(value_bits=24, max_devices=1024)
        )


def test_simulate_refuses_robust_strategies_with_secagg(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="--secagg with --strategy median"):
        SimConfig(out=tmp_path, secagg=True, strategy="median")
    with pytest.raises(ConfigError, match="needs --secagg"):
        SimConfig(out=tmp_path, secagg_dropout=0.2)
