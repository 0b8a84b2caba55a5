"""Attack 3 of issue 17 over a real Mosquitto: one update claims 2**62 samples.

FedAvg weighs by the reported count; with only the absolute clamp (100,000) one liar among
honest devices carried ~99 % of the average (clip_norm bounds an update's size, not its
weight). Now a round's weights are capped at ``max_sample_ratio`` times the lower median of
the previous round's weights, and a new fleet's first round, which has none, is folded again
at its close with its own (aggregator/weighting.py): the liar weighs as much as four ordinary
devices in every round, and the model stays near the honest-only FedAvg.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedge.codecs import parse_codec
from simulation.datasets import FederatedData, make_federated
from tests.integration.fleet_helpers import update_for, wait_until

pytestmark = pytest.mark.integration

HONEST = 8
CLIP = 1.0
RATIO = 4.0


@pytest.fixture(scope="module")
def digits3() -> FederatedData:
    return make_federated("digits", 3, "iid", seed=0)


def _flat(d: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([d[k].astype(np.float64).ravel() for k in sorted(d)])


def test_a_liar_no_longer_buys_the_average(fleet_factory: Any, digits3: FederatedData) -> None:
    fleet = fleet_factory(
        digits3,
        rounds=2,
        target_devices=HONEST + 1,
        min_devices=HONEST + 1,
        round_timeout=30,
        strategy_opts={"clip_norm": CLIP},
        max_sample_ratio=RATIO,
    )
    fleet.start_aggregator()
    agg = fleet.aggregator
    devices = [fleet.raw_device(f"dev-{i}") for i in range(HONEST + 1)]  # the last one lies
    liar = devices[-1]
    codec = parse_codec("fp32")
    rng = np.random.default_rng(5)
    spec = {k: v.shape for k, v in agg.weights.items()}
    # The liar pushes every weight one way, at exactly the clip norm.
    push = {k: np.ones(s, np.float32) for k, s in spec.items()}
    scale = CLIP / np.linalg.norm(_flat(push))
    push = {k: (v * scale).astype(np.float32) for k, v in push.items()}
    counts = [100 + 10 * i for i in range(HONEST)]
    steps: list[tuple[np.ndarray, np.ndarray]] = []
    try:
        for round_id in (1, 2):
            wait_until(lambda r=round_id: agg.version == r - 1, 20, f"version {round_id - 1}")
            before = {k: v.copy() for k, v in agg.weights.items()}
            honest = []
            for dev, n in zip(devices[:HONEST], counts, strict=True):
                delta = {k: rng.normal(0, 1e-3, s).astype(np.float32) for k, s in spec.items()}
                honest.append(delta)
                task = dev.wait_task(round_id)
                dev.send(
                    update_for(
                        before, dev.device_id, task, delta=codec.encode(delta), num_samples=n
                    )
                )
            task = liar.wait_task(round_id)
            liar.send(
                update_for(
                    before, liar.device_id, task, delta=codec.encode(push), num_samples=2**62
                )
            )
            wait_until(lambda r=round_id: agg.version == r, 20, f"version {round_id}")
            honest_avg = sum(_flat(d) * n for d, n in zip(honest, counts, strict=True))
            steps.append((_flat(agg.weights) - _flat(before), honest_avg / sum(counts)))
    finally:
        for d in devices:
            d.close()

    liar_dir = _flat(push)
    # Round 1 has no reference: it is folded again at its close with RATIO x its own lower
    # median (the liar's count clamped to max_num_samples does not move it); round 2 takes
    # the cap from round 1's weights. Both give the liar RATIO x 140.
    cap = RATIO * sorted([*counts, agg.config.max_num_samples])[HONEST // 2]
    share = cap / (cap + sum(counts))
    for round_id, (got, honest_step) in enumerate(steps, 1):
        expected = honest_step + share * (liar_dir - honest_step)
        np.testing.assert_allclose(got, expected, atol=1e-6)
        pull = np.linalg.norm(got - honest_step) / np.linalg.norm(liar_dir - honest_step)
        print(
            f"\nround {round_id}: the liar's pull on the step {pull:.3f} (weight share {share:.3f})"
        )
        assert pull < 0.4  # 0.989 with only the absolute clamp
    assert agg.metrics.events["clamped_samples"] == 2
