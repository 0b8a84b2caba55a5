"""Every strategy through the whole system over a real Mosquitto: versions are published,
the model moves, and it stays finite (robust strategies with enough devices per round)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from aggregator.strategies import STRATEGIES
from models.onnx_weights import read_initializers
from simulation.datasets import FederatedData, make_federated
from tests.integration.fleet_helpers import wait_until

pytestmark = pytest.mark.integration

OPTS: dict[str, dict[str, str]] = {
    "krum": {"f": "1"},  # needs 2f+3 = 5 updates per round
    "multikrum": {"f": "1", "m": "3"},
    "trimmed_mean": {"beta": "0.2"},
    "dp-fedavg": {"noise_multiplier": "0.1", "expected_devices": "5"},
}


@pytest.fixture(scope="module")
def digits5() -> FederatedData:
    return make_federated("digits", 5, "iid", seed=0)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_runs_over_the_broker(
    fleet_factory: Any, digits5: FederatedData, name: str
) -> None:
    fleet = fleet_factory(
        digits5,
        rounds=2,
        target_devices=5,
        min_devices=5,
        round_timeout=30,
        strategy=name,
        strategy_opts=OPTS.get(name, {}),
    )
    fleet.start_aggregator()
    for i in range(5):
        fleet.add_agent(i)

    wait_until(fleet.aggregator.done.is_set, 60, f"two versions with {name}")

    reg = fleet.aggregator.registry
    v0, v2 = (
        read_initializers(reg.path(0).read_bytes()),
        read_initializers(reg.path(2).read_bytes()),
    )
    assert all(np.isfinite(w).all() for w in v2.values())
    assert any(not np.array_equal(v0[k], v2[k]) for k in v0)
    assert [r["devices"] for r in fleet.records] == [5, 5]
    if name == "fedprox":  # the proximal term reached the devices through the task
        assert all(seen[-1].hyper.prox_mu > 0 for seen in fleet.tasks_seen.values())


def test_adaptive_rates_and_early_stopping_show_in_the_metrics(
    fleet_factory: Any, digits5: FederatedData
) -> None:
    """Devices stop on their held-out loss (lr 5 overshoots, so they do), report the epochs
    they ran, and both learning rates follow the central accuracy, visible per version."""
    from aggregator.config import HyperConfig, PlateauSettings

    flat = PlateauSettings(factor=0.5, patience=0, threshold=0.5, min_lr=1e-3)
    fleet = fleet_factory(
        digits5,
        rounds=3,
        target_devices=5,
        min_devices=5,
        round_timeout=30,
        hyper=HyperConfig(epochs=20, lr=5.0),
        early_stop_patience=1,
        val_fraction=0.2,
        adaptive_lr=flat,
        adaptive_server_lr=flat,
    )
    fleet.start_aggregator()
    for i in range(5):
        fleet.add_agent(i)
    wait_until(fleet.aggregator.done.is_set, 60, "three versions with early stopping")

    recs = fleet.records
    assert all(seen[-1].hyper.early_stop_patience == 1 for seen in fleet.tasks_seen.values())
    assert all(r["early_stopped"] >= 1 for r in recs)
    assert all(1 <= r["local_epochs_mean"] < 20 for r in recs)
    # The first version sets the best; threshold 0.5 (+50 %) makes every later one a plateau,
    # so from the third version on each is made with half the rates of the one before.
    assert [r["server_lr"] for r in recs] == [1.0, 1.0, 0.5]
    assert [r["client_lr"] for r in recs] == [5.0, 5.0, 2.5]


def test_a_learning_rate_step_survives_a_restart(
    fleet_factory: Any, digits5: FederatedData
) -> None:
    """The schedules step on a version's accuracy after its first checkpoint; the service
    checkpoints again, so a restart right after the version keeps the reduced rate."""
    from aggregator.config import PlateauSettings

    flat = PlateauSettings(factor=0.5, patience=0, threshold=0.5, min_lr=1e-3)
    fleet = fleet_factory(
        digits5, rounds=2, target_devices=5, min_devices=5, round_timeout=30,
        adaptive_server_lr=flat,
    )  # fmt: skip
    fleet.start_aggregator()
    for i in range(5):
        fleet.add_agent(i)
    wait_until(fleet.aggregator.done.is_set, 60, "two versions")
    assert fleet.aggregator.strategy.server_lr == 0.5  # version 2 was a plateau

    again = fleet.restart_aggregator()
    assert again.adaptive.server is not None
    assert (again.adaptive.server.value, again.strategy.server_lr) == (0.5, 0.5)
