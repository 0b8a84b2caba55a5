"""Secure aggregation over a real Mosquitto: the new model equals the plain quantized FedAvg
round's exactly, dropouts after sharing and after uploading keep the sum correct, too few
survivors fail the round cleanly, and the aggregator receives, journals and checkpoints only
masked vectors, sealed shares and the model."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from aggregator.config import SecureAggregationConfig
from aggregator.strategies import make_strategy
from edge_agent.secagg import SecAggOptions
from fedge.envelopes import DeviceStatus
from fedge.secagg.messages import (
    Advertise,
    MaskedInput,
    ShareBundle,
    Signed,
    UnmaskReply,
    read_body,
)
from fedge.secagg.ring import RingSpec, flatten, pack_bits, unflatten, unpack_bits
from simulation.datasets import FederatedData, make_federated
from tests.integration.fleet_helpers import wait_until

pytestmark = pytest.mark.integration

SA = SecureAggregationConfig(
    value_bits=8, clip=0.5, weight_cap=64, advertise_timeout=4, share_timeout=4, unmask_timeout=4
)


@pytest.fixture(scope="module")
def digits10() -> FederatedData:
    return make_federated("digits", 10, "iid", seed=0)


@dataclass(frozen=True)
class Trained:
    weights: Mapping[str, np.ndarray]
    num_samples: int
    loss: float = 0.0
    accuracy: float = 0.0
    seconds: float = 0.0


def fixed_delta(i: int, base: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + i)
    return {k: rng.normal(0, 0.2, np.shape(v)).astype(np.float32) for k, v in base.items()}


def samples(i: int) -> int:
    return 20 + 7 * i


def make_train(i: int) -> Any:
    """A train function whose delta is known to the test (device i, any round)."""

    def train(arch: Any, weights: Mapping[str, np.ndarray], *_: Any, **__: Any) -> Trained:
        d = fixed_delta(i, weights)
        return Trained({k: weights[k] + d[k] for k in weights}, samples(i))

    return train


def ring_input(i: int, base: Mapping[str, np.ndarray], round_id: int, ring: RingSpec) -> Any:
    """What device i (seed i) puts in the ring: the same delta, rounding seed and quantizer."""
    d = fixed_delta(i, base)
    delta = flatten({k: (base[k] + d[k]).astype(np.float64) - base[k] for k in base})
    return ring.encode(delta, samples(i), np.random.default_rng([i, round_id]))


def plain_quantized_fedavg(
    base: Mapping[str, np.ndarray], inputs: list[Any], ring: RingSpec
) -> Any:
    """The plain (unmasked) quantized FedAvg round of the same inputs."""
    acc = np.zeros(inputs[0].size, np.uint64)
    for q in inputs:
        ring.add(acc, q)
    values, weight = ring.decode_sum(acc)
    strategy = make_strategy("fedavg", {})
    spec = {k: tuple(np.shape(v)) for k, v in base.items()}
    strategy.begin_round(spec)
    strategy.fold_sum(unflatten(values, spec), weight, len(inputs))  # type: ignore[attr-defined]
    return strategy.finish(base)


def run_secure_round(fleet: Any, n: int, vanish: dict[int, str]) -> tuple[dict[str, Any], Any]:
    fleet.start_aggregator()  # loads version 0
    base = {k: v.copy() for k, v in fleet.aggregator.weights.items()}
    for i in range(n):
        stage = vanish.get(i)
        opts = SecAggOptions(secure_only=True, vanish_after=(lambda r, s=stage: s))
        fleet.add_agent(i, train_fn=make_train(i), secagg=opts)
    wait_until(lambda: fleet.records or fleet.aggregator.failed_rounds, 60, "a secure round")
    return base, fleet.records


def test_secure_round_equals_plain_quantized_fedavg_exactly(
    fleet_factory: Any, digits10: FederatedData
) -> None:
    fleet = fleet_factory(
        digits10, secure_aggregation=SA, rounds=1, target_devices=6, min_devices=3,
        round_timeout=40,
    )  # fmt: skip
    base, recs = run_secure_round(fleet, 6, {})
    assert recs, f"round failed: {fleet.aggregator.failed_rounds}"
    ring = RingSpec.for_devices(SA.value_bits, 6, SA.clip, SA.weight_cap)
    expect = plain_quantized_fedavg(base, [ring_input(i, base, 1, ring) for i in range(6)], ring)
    got = fleet.aggregator.weights
    for k in expect:
        np.testing.assert_array_equal(got[k], expect[k])
    assert recs[0]["devices"] == 6
    assert recs[0]["secagg"]["survivors"] == 6


def test_dropouts_after_sharing_and_after_upload_keep_the_sum(
    fleet_factory: Any, digits10: FederatedData
) -> None:
    # 20 % vanish after sharing (their masks are taken back out with their reconstructed
    # keys), 10 % after uploading (their input counts; they just do not help unmask).
    # Vanished devices stay online, so the masked stage waits to its deadline (round_timeout
    # less unmask_timeout): keep it short.
    fleet = fleet_factory(
        digits10, secure_aggregation=SA, rounds=1, target_devices=10, min_devices=5,
        round_timeout=14,
    )  # fmt: skip
    vanish = {2: "shares", 7: "shares", 4: "masked"}
    seen: list[tuple[str, bytes]] = []
    handle = fleet.aggregator.rounds.handle
    fleet.aggregator.rounds.handle = lambda t, p: (seen.append((t, p)), handle(t, p))[1]
    base, recs = run_secure_round(fleet, 10, vanish)
    assert recs, f"round failed: {fleet.aggregator.failed_rounds}"
    survivors = [i for i in range(10) if vanish.get(i) != "shares"]
    ring = RingSpec.for_devices(SA.value_bits, 10, SA.clip, SA.weight_cap)
    inputs = {i: ring_input(i, base, 1, ring) for i in survivors}
    expect = plain_quantized_fedavg(base, list(inputs.values()), ring)
    for k in expect:
        np.testing.assert_array_equal(fleet.aggregator.weights[k], expect[k])
    assert recs[0]["devices"] == 8

    # Everything the aggregator received: adverts, sealed shares, masked vectors, replies.
    kinds = {"advertise": Advertise, "shares": ShareBundle, "masked": MaskedInput,
             "reply": UnmaskReply}  # fmt: skip
    secagg_head = f"{fleet.topics.prefix}/secagg/"
    received = []
    for topic, payload in list(seen):  # the aggregator's thread may still append statuses
        if not topic.startswith(f"{fleet.topics.prefix}/"):
            continue  # an earlier test's fleet: the suite's aggregators share one session
        if topic.startswith(secagg_head):
            received.append((topic, payload))
        else:  # online/offline announcements, nothing else
            assert fleet.topics.device_of(topic, "status"), topic
            DeviceStatus.from_bytes(payload)
    plain_packed = {pack_bits(q, ring.bits) for q in inputs.values()}
    masked = 0
    for topic, payload in received:
        stage = topic.split("/")[-2]
        assert stage in kinds, topic
        body: Any = read_body(Signed.from_bytes(payload, fleet.aggregator.limits), kinds[stage],
                              fleet.aggregator.limits)  # fmt: skip
        if stage == "masked":
            masked += 1
            assert body.data not in plain_packed
            y = unpack_bits(body.data, ring.bits, body.count)
            bins = 16
            hist = np.bincount((y * bins >> ring.bits).astype(np.int64), minlength=bins)
            expected = y.size / bins
            assert ((hist - expected) ** 2 / expected).sum() < 37.7  # chi2(15) at 0.999
    assert masked == 8
    # Journal: nothing of the round; checkpoint: the model, not an input.
    journal = fleet.aggregator.state_dir / "journal"
    assert all(p.stat().st_size == 0 for p in journal.glob("*")) if journal.exists() else True
    ckpt = fleet.aggregator.ckpt_path.read_bytes()
    for q in inputs.values():
        assert pack_bits(q, ring.bits) not in ckpt
        assert q.astype("<u4").tobytes()[:64] not in ckpt
    for i in survivors:
        d = fixed_delta(i, base)
        assert d["fc1.weight"].tobytes()[:64] not in ckpt


def test_too_few_survivors_fail_the_round_cleanly(
    fleet_factory: Any, digits10: FederatedData
) -> None:
    fleet = fleet_factory(
        digits10, secure_aggregation=SA, rounds=1, target_devices=4, min_devices=2,
        round_timeout=30,
    )  # fmt: skip
    # 4 devices, complete graph (degree 3), threshold 2: three vanish after uploading, so
    # every survivor's seed has one holder left.
    vanish = {0: "masked", 1: "masked", 2: "masked"}
    fleet.start_aggregator()
    before = {k: v.copy() for k, v in fleet.aggregator.weights.items()}
    for i in range(4):
        stage = vanish.get(i)
        opts = SecAggOptions(secure_only=True, vanish_after=(lambda r, s=stage: s))
        fleet.add_agent(i, train_fn=make_train(i), secagg=opts)
    wait_until(lambda: fleet.aggregator.failed_rounds >= 1, 40, "the round to fail")
    time.sleep(0.2)
    assert fleet.aggregator.version == 0
    for k, v in before.items():
        np.testing.assert_array_equal(fleet.aggregator.weights[k], v)
    lines = fleet.aggregator.config.metrics_path.read_text().splitlines()
    assert any("secagg unmask: cannot unmask" in line for line in lines)
    assert fleet.aggregator.round is not None  # the next round opened


def test_signed_fleet_refuses_an_advert_not_signed_by_the_enrolled_key(
    fleet_factory: Any, digits10: FederatedData, tmp_path: Any
) -> None:
    from fedge.identity import SigningKey, save_signing_key
    from fedge.key_registry import KeyRegistry

    registry = KeyRegistry(tmp_path / "keys").create()
    keys = [SigningKey.generate() for _ in range(4)]
    for i, k in enumerate(keys):
        registry.add(f"dev-{i}", k.verify_key)
    agg_key = SigningKey.generate()
    save_signing_key(tmp_path / "keys" / "aggregator.key", agg_key)
    fleet = fleet_factory(
        digits10, secure_aggregation=SA, rounds=1, target_devices=4, min_devices=3,
        round_timeout=30, device_keys=tmp_path / "keys",
        signing_key=tmp_path / "keys" / "aggregator.key",
    )  # fmt: skip
    fleet.start_aggregator()
    base = {k: v.copy() for k, v in fleet.aggregator.weights.items()}
    opts = SecAggOptions(secure_only=True)
    for i in range(4):
        # dev-3 signs with a key that is not the one enrolled for it.
        key = keys[i] if i < 3 else SigningKey.generate()
        fleet.add_agent(i, train_fn=make_train(i), secagg=opts, signing_key=key,
                        aggregator_key=agg_key.verify_key)  # fmt: skip
    wait_until(lambda: fleet.records or fleet.aggregator.failed_rounds, 40, "a secure round")
    assert fleet.records, f"round failed: {fleet.aggregator.failed_rounds}"
    assert fleet.aggregator.metrics.rejected.get("bad_signature", 0) >= 1
    ring = RingSpec.for_devices(SA.value_bits, 4, SA.clip, SA.weight_cap)
    expect = plain_quantized_fedavg(base, [ring_input(i, base, 1, ring) for i in range(3)], ring)
    for k in expect:
        np.testing.assert_array_equal(fleet.aggregator.weights[k], expect[k])
    assert sorted(fleet.records[0]["counted"]) == ["dev-0", "dev-1", "dev-2"]


def test_central_dp_noise_on_the_secure_sum(fleet_factory: Any, digits10: FederatedData) -> None:
    fleet = fleet_factory(
        digits10, secure_aggregation=SA, rounds=1, target_devices=4, min_devices=3,
        round_timeout=30, strategy="dp-fedavg",
        strategy_opts={"clip_norm": 1.0, "noise_multiplier": 0.5, "expected_devices": 4},
    )  # fmt: skip
    fleet.start_aggregator()
    base = {k: v.copy() for k, v in fleet.aggregator.weights.items()}
    for i in range(4):
        fleet.add_agent(i, train_fn=make_train(i), secagg=SecAggOptions(secure_only=True))
    wait_until(lambda: fleet.records or fleet.aggregator.failed_rounds, 40, "a secure DP round")
    rec = fleet.records[0]
    params = sum(v.size for v in base.values())
    # Sensitivity: the clip plus at most one quantum per coordinate.
    assert rec["dp_sensitivity"] == pytest.approx(1.0 + params**0.5 * SA.clip / 127)
    assert rec["dp_epsilon"] > 0
    assert rec["devices"] == 4
    moved = np.concatenate([(fleet.aggregator.weights[k] - base[k]).ravel() for k in base])
    # Each fixed delta has norm ~ 0.2 * sqrt(params) >> 1: clipped to 1 on the device, so the
    # step is the noise (std 0.5 * sensitivity / 4) plus a mean of norm <= 1.
    assert np.std(moved) == pytest.approx(0.5 * rec["dp_sensitivity"] / 4, rel=0.1)
