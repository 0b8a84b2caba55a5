"""Staged rollouts over a real Mosquitto (issue 14): serving versions apart from training,
signed manifests, shadow evaluation on each device's hold-out, automatic rollback.

Each test trains one round (v0 is the seeded initial model, v1 the trained one), then
releases versions with the operator's real path (request files in the aggregator's state
directory). Cohorts are chosen from the devices' cohort hashes so a stage holds exactly the
devices the test means.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from paho.mqtt.client import CallbackAPIVersion, Client
from paho.mqtt.enums import MQTTProtocolVersion

from aggregator.rollout_requests import submit, wait_result
from edge_agent.agent import EdgeAgent
from edge_agent.data import LocalData
from edge_agent.serving_store import ServingStore
from fedge.envelopes import ReleaseManifest, ReleaseMode, cohort_bound, cohort_hash, in_cohort
from fedge.identity import SigningKey, load_signing_key
from simulation.broker import MosquittoBroker
from simulation.datasets import FederatedData, make_federated
from simulation.keys import SimKeys
from tests.integration.fleet_helpers import Fleet, wait_until

pytestmark = pytest.mark.integration

DEVICES = 6


@pytest.fixture(scope="module")
def digits() -> FederatedData:
    return make_federated("digits", DEVICES, "iid", seed=0)


@pytest.fixture(scope="module")
def release_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """The sharded ACL plus ``mallory``, who may write release topics: what a compromised
    broker (the threat model) or anyone on the demo profile can do."""
    from simulation.broker import CONFIG_DIR, MosquittoNotFound, find_mosquitto

    try:
        find_mosquitto()
    except MosquittoNotFound as exc:
        pytest.skip(str(exc))
    d = tmp_path_factory.mktemp("release-broker")
    acl = d / "acl"
    acl.write_text(
        (CONFIG_DIR / "acl.sharded").read_text() + "\nuser mallory\ntopic write fedge/+/release/#\n"
    )
    with MosquittoBroker(d / "broker", acl=acl) as started:
        yield started


def fraction_holding(fleet: str, devices: list[str], k: int) -> float:
    """A stage fraction whose cohort is exactly the ``k`` devices of lowest cohort hash."""
    hashes = sorted(cohort_hash(fleet, d) for d in devices)
    frac = (hashes[k - 1] + hashes[k]) / 2 / 2**64
    inside = [d for d in devices if in_cohort(fleet, d, cohort_bound(frac))]
    assert len(inside) == k
    return frac


class Rig:
    def __init__(self, broker: MosquittoBroker, tmp: Path, data: FederatedData) -> None:
        self.keys = SimKeys.make(tmp / "keys", DEVICES)
        for i in range(DEVICES):  # the agents are dev-0..
            (self.keys.registry / "devices" / f"dev-{i:04d}.pub").rename(
                self.keys.registry / "devices" / f"dev-{i}.pub"
            )
        self.data = data
        self.fleet = Fleet(
            broker, tmp, data, rounds=1, target_devices=DEVICES, min_devices=DEVICES,
            round_timeout=30, device_keys=self.keys.registry, signing_key=self.keys.aggregator_key,
        )  # fmt: skip
        self.fleet.start_aggregator()
        for i in range(DEVICES):
            self.add(i)
        wait_until(self.agg.done.is_set, 60, "one trained version")

    @property
    def agg(self) -> Any:
        return self.fleet.aggregator

    @property
    def devices(self) -> list[str]:
        return [f"dev-{i}" for i in range(DEVICES)]

    def add(self, i: int) -> EdgeAgent:
        # Each device's hold-out: its own slice of the central test split (never trained on).
        x, y = self.data.test
        share = len(y) // DEVICES
        holdout = LocalData(x[i * share : (i + 1) * share], y[i * share : (i + 1) * share])
        return self.fleet.add_agent(
            i,
            signing_key=self.keys.device_keys[i],
            aggregator_key=self.keys.aggregator_key_pub,
            holdout=holdout,
        )

    def command(self, cmd: str, **args: Any) -> str:
        state = self.fleet.config.state_dir
        answer = wait_result(state, submit(state, cmd, args), 10)
        assert answer["ok"], answer
        return str(answer["message"])

    def serving(self, dev: str) -> int | None:
        return self.fleet.agents[dev].release.serving

    def all_serve(self, version: int, devices: list[str] | None = None) -> None:
        devs = devices or self.devices
        wait_until(
            lambda: all(self.serving(d) == version for d in devs), 30, f"devices serving v{version}"
        )

    def served(self, dev: str) -> set[int]:
        """Every version ``dev`` ever served (its on-disk history of switches)."""
        return {h["version"] for h in ServingStore(self.fleet.tmp / dev).history}

    def outcome(self, want: str) -> None:
        wait_until(lambda: self.agg.rollout.state.outcome == want, 30, f"rollout {want}")

    def register_shuffled(self, source: int, version: int) -> None:
        """A deliberately broken candidate: ``source``'s weights permuted within each tensor."""
        from models.onnx_export import OnnxTemplate
        from models.onnx_weights import read_initializers

        onnx, meta = self.agg.registry.load(source)
        rng = np.random.default_rng(0)
        w = {
            k: rng.permutation(v.ravel()).reshape(v.shape)
            for k, v in read_initializers(onnx).items()
        }
        bad = OnnxTemplate("mlp", 64, 10).render(w)
        import hashlib

        sha = hashlib.sha256(bad).hexdigest()
        self.agg.registry.save(
            version, bad, {**meta, "version": version, "sha256": sha, "bytes": len(bad)}
        )


@pytest.fixture
def rig(release_broker: MosquittoBroker, digits: FederatedData, tmp_path: Path) -> Iterator[Rig]:
    r = Rig(release_broker, tmp_path, digits)
    try:
        yield r
    finally:
        r.fleet.close()


def test_good_candidate_reaches_every_device_bad_one_rolls_back_inside_the_first_cohort(
    rig: Rig,
) -> None:
    rig.command("start", version=0, stages=[1.0])  # the first release: nothing to compare with
    rig.outcome("promoted")
    rig.all_serve(0)
    fleet = rig.fleet.topics.fleet
    first = fraction_holding(fleet, rig.devices, 2)
    rig.command("start", version=1, stages=[first, 0.6, 1.0], max_regression=1.0, min_devices=2)
    rig.outcome("promoted")
    rig.all_serve(1)
    steps = [h["event"] for h in rig.agg.rollout.state.history]
    assert steps[-3:] == ["advanced", "advanced", "promoted"]
    for dev in rig.devices:  # training went on apart from serving: v1 trained, v1 served
        assert rig.fleet.agents[dev].model.version == 1

    rig.register_shuffled(1, 2)
    rig.command("start", version=2, stages=[first, 1.0], max_regression=1.0, min_devices=2)
    rig.outcome("rolled_back")
    cohort = {d for d in rig.devices if in_cohort(fleet, d, cohort_bound(first))}
    # The canaries evaluated it and reported the regression; no other device ever served it,
    # and the canaries are back on their last known good.
    for dev in rig.devices:
        report = rig.fleet.agents[dev].release.report
        if dev in cohort:
            assert report is not None
            assert report.version == 2
            assert report.regression_pp > 1.0
        else:
            assert 2 not in rig.served(dev), dev
    rig.all_serve(1)
    last = rig.agg.rollout.state.history[-1]
    assert (last["event"], last["stage"]) == ("rolled_back", 0)
    events = rig.agg.metrics.events
    assert events["rollout_rolled_back"] == 1
    assert events["rollout_promoted"] == 2


def test_forged_unsigned_and_stale_manifests_are_refused(rig: Rig) -> None:
    rig.command("start", version=0, stages=[1.0])
    rig.outcome("promoted")
    rig.all_serve(0)
    held = ReleaseManifest.from_bytes(rig.agg.rollout.state.manifest)
    forged = ReleaseManifest(
        rig.fleet.topics.fleet, held.seq + 5, 1, rig.agg.registry.meta(1)["sha256"], None, "",
        0, (1.0,), cohort_bound(1.0), ReleaseMode.DIRECT, 0.0, time.time(),
    )  # fmt: skip
    real = load_signing_key(rig.keys.aggregator_key)
    stale = replace(held, seq=held.seq)  # genuine bytes of an older seq come after a newer one
    payloads = [
        forged.to_bytes(),  # unsigned
        replace(forged, signature=SigningKey.generate().sign(forged.digest())).to_bytes(),
        # A genuine signature over other fields: any changed field breaks it.
        replace(forged, signature=real.sign(replace(forged, version=0).digest())).to_bytes(),
    ]
    rig.command("rollback", version=0)  # seq moves on: the held manifest becomes stale
    wait_until(
        lambda: all(
            rig.fleet.agents[d].release.store.manifest.seq > held.seq  # type: ignore[union-attr]
            for d in rig.devices
        ),
        20,
        "the newer manifest",
    )
    payloads.append(stale.to_bytes())
    before = {d: rig.fleet.agents[d].counters.releases_rejected for d in rig.devices}
    _publish_as_mallory(rig.fleet, payloads)
    wait_until(
        lambda: all(
            rig.fleet.agents[d].counters.releases_rejected >= before[d] + len(payloads)
            for d in rig.devices
        ),
        20,
        "every forgery refused",
    )
    time.sleep(0.3)
    for dev in rig.devices:
        assert rig.serving(dev) == 0
        assert 1 not in rig.served(dev)


def _publish_as_mallory(fleet: Fleet, payloads: list[bytes]) -> None:
    c = Client(
        CallbackAPIVersion.VERSION2, client_id="mallory", protocol=MQTTProtocolVersion.MQTTv5
    )
    c.username_pw_set("mallory")
    c.connect(fleet.url.host, fleet.url.port)
    c.loop_start()
    for p in payloads:
        info = c.publish(fleet.topics.release, p, qos=1, retain=True)
        info.wait_for_publish(5)
        time.sleep(0.1)  # one at a time: devices take only the newest of a retained topic
    c.disconnect()
    c.loop_stop()


def test_offline_canary_holds_the_stage_restart_resumes_rollback_goes_to_an_older_version(
    rig: Rig,
) -> None:
    rig.command("start", version=0, stages=[1.0])
    rig.outcome("promoted")
    rig.all_serve(0)
    fleet = rig.fleet.topics.fleet
    first = fraction_holding(fleet, rig.devices, 1)
    (canary,) = [d for d in rig.devices if in_cohort(fleet, d, cohort_bound(first))]
    agent = rig.fleet.agents[canary]
    agent.stop()
    wait_until(lambda: canary not in rig.agg.online, 10, "the canary offline")

    rig.command("start", version=1, stages=[first, 1.0], min_devices=1)
    time.sleep(1.0)
    assert rig.agg.rollout.state.active.stage == 0  # waits for its (offline) canary
    rig.fleet.restart_aggregator()
    assert rig.agg.rollout.state.active.stage == 0  # resumed from rollout.json
    idx = int(canary.split("-")[1])
    rig.add(idx)  # the device comes back (same state directory)
    rig.outcome("promoted")
    rig.all_serve(1)

    rig.command("rollback", version=0)  # an older serving version, from a signed manifest
    rig.all_serve(0)
    for dev in rig.devices:
        assert rig.fleet.agents[dev].model.version == 1  # training stays on v1


def test_simulate_rollout_bad_candidate_writes_a_rolled_back_record(tmp_path: Path) -> None:
    from simulation.fleet import SimConfig, simulate

    cfg = SimConfig(
        out=tmp_path / "sim", devices=6, rounds=2, epochs=1, partition="iid",
        rollout=(0.3, 1.0), rollout_candidate="bad", rollout_min_devices=1,
    )  # fmt: skip
    summary = simulate(cfg, say=lambda _line: None)
    record = json.loads((tmp_path / "sim" / "rollout.json").read_text())
    assert summary["rollout"]["outcome"] == record["outcome"] == "rolled_back"
    assert record["candidate"] == {"kind": "bad", "version": 3, "trained_version": 2}
    (stage,) = record["stages"]
    assert (stage["fraction"], stage["decision"]) == (0.3, "rolled_back")
    assert stage["reports"]
    assert all(r["base"] == 1 for r in stage["reports"].values())
    assert record["outside_cohort_served"] == 0
    assert set(record["served_candidate"]) <= set(stage["cohort"])
    assert set(record["serving"].values()) == {1}  # everyone back on the baseline
