"""Attack 1 of issue 17 over a real Mosquitto: a forged retained task with round 2**31.

Before tasks were signed every agent trained it, stored ``last_round = 2**31`` and then idled
on every real round, even after a restart. Agents that hold the aggregator's key now refuse
unsigned and badly signed tasks before holding them, so the fleet keeps training real rounds
and nothing of the forgery reaches their disk.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from paho.mqtt.client import CallbackAPIVersion, Client
from paho.mqtt.enums import MQTTProtocolVersion

from edge_agent.store import AgentStore
from fedge.envelopes import RoundTask, TrainHyper
from fedge.identity import SigningKey, load_signing_key
from simulation.broker import MosquittoBroker
from simulation.datasets import FederatedData, make_federated
from simulation.keys import SimKeys
from tests.integration.fleet_helpers import Fleet, update_for, wait_until

pytestmark = pytest.mark.integration

FORGED_ROUND = 2**31


@pytest.fixture(scope="module")
def digits3() -> FederatedData:
    return make_federated("digits", 3, "iid", seed=0)


@pytest.fixture(scope="module")
def forger_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """The sharded ACL plus an identity that may write tasks: what a compromised broker (in
    the threat model) or anyone on the demo profile can do. Not the ``aggregator`` username
    itself: taking over its client id would also wipe its session, another attack."""
    from simulation.broker import CONFIG_DIR, MosquittoNotFound, find_mosquitto

    try:
        find_mosquitto()
    except MosquittoNotFound as exc:
        pytest.skip(str(exc))
    d = tmp_path_factory.mktemp("forger-broker")
    acl = d / "acl"
    acl.write_text(
        (CONFIG_DIR / "acl.sharded").read_text() + "\nuser mallory\ntopic write fedge/+/round/#\n"
    )
    with MosquittoBroker(d / "broker", acl=acl) as started:
        yield started


def _forge(host: str, port: int, topic: str, payloads: list[bytes]) -> None:
    v5 = MQTTProtocolVersion.MQTTv5
    c = Client(CallbackAPIVersion.VERSION2, client_id="mallory", protocol=v5)
    c.username_pw_set("mallory")
    c.connect(host, port)
    c.loop_start()
    for p in payloads:
        info = c.publish(topic, p, qos=1, retain=True)
        info.wait_for_publish(5)
        assert info.rc == 0
    c.disconnect()
    c.loop_stop()


def test_forged_retained_task_does_not_brick_agents_that_hold_the_key(
    forger_broker: MosquittoBroker, digits3: FederatedData, tmp_path: Path
) -> None:
    keys = SimKeys.make(tmp_path / "keys", 3)
    for i in range(3):  # the agents are dev-0..dev-2
        (keys.registry / "devices" / f"dev-{i:04d}.pub").rename(
            keys.registry / "devices" / f"dev-{i}.pub"
        )
    fleet = Fleet(
        forger_broker,
        tmp_path,
        digits3,
        rounds=4,
        target_devices=3,
        min_devices=3,
        round_timeout=20,
        device_keys=keys.registry,
        signing_key=keys.aggregator_key,
    )
    try:
        fleet.start_aggregator()
        agents = [
            fleet.add_agent(
                i, signing_key=keys.device_keys[i], aggregator_key=keys.aggregator_key_pub
            )
            for i in range(3)
        ]
        agg = fleet.aggregator
        wait_until(lambda: agg.version >= 1, 30, "a first signed version")

        base = agg.version
        forged = RoundTask(
            round=FORGED_ROUND,
            base_version=base,
            deadline=time.time() + 3600,
            codec="fp32",
            hyper=TrainHyper(),
            nonce=os.urandom(16),
            issued=time.time(),
        )
        mallory = SigningKey.generate()
        real = load_signing_key(keys.aggregator_key)
        genuine = replace(forged, round=base + 1)
        genuine = replace(genuine, signature=real.sign(genuine.digest()))
        payloads = [
            forged.to_bytes(),  # unsigned
            replace(forged, signature=mallory.sign(forged.digest())).to_bytes(),  # wrong key
            # A genuine signature over another round's fields: any changed field breaks it.
            replace(genuine, round=FORGED_ROUND).to_bytes(),
        ]
        url = fleet.url
        _forge(url.host, url.port, fleet.topics.task, payloads)

        wait_until(agg.done.is_set, 40, "the fleet to keep training real rounds")
        assert agg.version == 4
        for a in agents:
            assert a.counters.tasks_rejected >= len(payloads), a.device_id
            assert a.last_round < FORGED_ROUND
            # Nothing of the forgery is on disk: a restarted agent resumes where it was.
            assert AgentStore(fleet.tmp / a.device_id).last_round() < FORGED_ROUND
        assert sum(a.counters.updates_sent for a in agents) == 3 * 4
    finally:
        fleet.close()


def test_a_device_bricked_before_the_fix_recovers_at_start(tmp_path: Path) -> None:
    """A stored last round far ahead of the held model (the forgery's legacy) is forgotten."""
    from fedge.limits import DEFAULT_LIMITS
    from fedge.task_check import plausible_last_round

    store = AgentStore(tmp_path)
    store.set_last_round(FORGED_ROUND)
    assert not plausible_last_round(store.last_round(), 5, DEFAULT_LIMITS)
    assert plausible_last_round(6, 5, DEFAULT_LIMITS)
    assert plausible_last_round(FORGED_ROUND, None, DEFAULT_LIMITS)


def test_a_shard_worker_with_the_key_refuses_the_forged_task(
    forger_broker: MosquittoBroker, digits3: FederatedData, tmp_path: Path
) -> None:
    """A worker took a forged round too: every real task then looked stale, and it discarded
    the journals of all rounds below it. With the aggregator's key it refuses it."""
    from aggregator.sharded.worker import ShardWorker, WorkerConfig
    from fedge.transport.mux import Mux

    keys = SimKeys.make(tmp_path / "keys", 1)
    fleet = Fleet(
        forger_broker,
        tmp_path,
        digits3,
        codec="fp32",
        shard_workers=("aggregator-0",),
        shard_poll=0.2,
        target_devices=2,
        min_devices=2,
        round_timeout=20,
        rounds=1,
        signing_key=keys.aggregator_key,
    )
    mux = Mux("shards").start()
    cfg = WorkerConfig(
        str(fleet.url),
        fleet.topics.fleet,
        "aggregator-0",
        tmp_path / "w0",
        aggregator_key=keys.aggregator_key_pub,
    )
    worker = ShardWorker(cfg, mux)
    devices = []
    try:
        fleet.start_aggregator()
        worker.start()
        devices = [fleet.raw_device(f"dev-{i}") for i in range(2)]
        tasks = [d.wait_task(1) for d in devices]  # raw devices do not verify: keep these
        task = tasks[0]
        assert worker.ready.wait(20)
        # A round id within the plausible lead, so only the signature can refuse it.
        forged = RoundTask(
            round=task.round + 1000,
            base_version=0,
            deadline=time.time() + 3600,
            codec="fp32",
            hyper=TrainHyper(),
            nonce=os.urandom(16),
        )
        url = fleet.url
        _forge(url.host, url.port, fleet.topics.task, [forged.to_bytes()])
        time.sleep(0.5)
        weights = fleet.aggregator.weights
        for d, t in zip(devices, tasks, strict=True):
            d.send(update_for(weights, d.device_id, t, num_samples=10))
        wait_until(fleet.aggregator.done.is_set, 30, "the sharded round to close")
        assert worker.round is not None
        assert worker.round.round == task.round
    finally:
        for d in devices:
            d.close()
        worker.stop()
        time.sleep(0.2)
        mux.stop()
        fleet.close()
