"""Attack 1 of issue 17 over a real Mosquitto: a forged retained task with round 2**31.

Before tasks were signed every agent trained it, stored ``last_round = 2**31`` and then idled
on every real round, even after a restart. Agents that hold the aggregator's key now refuse
unsigned and badly signed tasks before holding them, so the fleet keeps training real rounds
and nothing of the forgery reaches their disk.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.client import CallbackAPIVersion, Client
from paho.mqtt.enums import MQTTProtocolVersion

from edge_agent.store import AgentStore
from fedge.envelopes import RoundTask, TrainHyper
from fedge.identity import SigningKey, load_signing_key
from simulation.datasets import FederatedData, make_federated
from simulation.keys import SimKeys
from tests.integration.fleet_helpers import wait_until

pytestmark = pytest.mark.integration

FORGED_ROUND = 2**31


@pytest.fixture(scope="module")
def digits3() -> FederatedData:
    return make_federated("digits", 3, "iid", seed=0)


def _publish_as_aggregator(host: str, port: int, topic: str, payloads: list[bytes]) -> None:
    """What anyone can do on the demo profile (and a compromised broker in production)."""
    c = Client(
        CallbackAPIVersion.VERSION2, client_id="mallory", protocol=MQTTProtocolVersion.MQTTv5
    )
    c.username_pw_set("aggregator")  # the ACL lets this username write round/
    c.connect(host, port)
    c.loop_start()
    for p in payloads:
        c.publish(topic, p, qos=1, retain=True).wait_for_publish(5)
    c.disconnect()
    c.loop_stop()


def test_forged_retained_task_does_not_brick_agents_that_hold_the_key(
    fleet_factory: Any, digits3: FederatedData, tmp_path: Path
) -> None:
    keys = SimKeys.make(tmp_path / "keys", 3)
    for i in range(3):  # the agents are dev-0..dev-2
        (keys.registry / "devices" / f"dev-{i:04d}.pub").rename(
            keys.registry / "devices" / f"dev-{i}.pub"
        )
    fleet = fleet_factory(
        digits3,
        rounds=4,
        target_devices=3,
        min_devices=3,
        round_timeout=20,
        device_keys=keys.registry,
        signing_key=keys.aggregator_key,
    )
    fleet.start_aggregator()
    agents = [
        fleet.add_agent(i, signing_key=keys.device_keys[i], aggregator_key=keys.aggregator_key_pub)
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
    _publish_as_aggregator(url.host, url.port, fleet.topics.task, payloads)

    wait_until(agg.done.is_set, 40, "the fleet to keep training real rounds")
    assert agg.version == 4
    for a in agents:
        assert a.counters.tasks_rejected >= len(payloads), a.device_id
        assert a.last_round < FORGED_ROUND
        # Nothing of the forgery is on disk: a restarted agent resumes where it was.
        assert AgentStore(fleet.tmp / a.device_id).last_round() < FORGED_ROUND
    assert sum(a.counters.updates_sent for a in agents) == 3 * 4


def test_a_device_bricked_before_the_fix_recovers_at_start(tmp_path: Path) -> None:
    """A stored last round far ahead of the held model (the forgery's legacy) is forgotten."""
    from edge_agent.task_check import plausible_last_round
    from fedge.limits import DEFAULT_LIMITS

    store = AgentStore(tmp_path)
    store.set_last_round(FORGED_ROUND)
    assert not plausible_last_round(store.last_round(), 5, DEFAULT_LIMITS)
    assert plausible_last_round(6, 5, DEFAULT_LIMITS)
    assert plausible_last_round(FORGED_ROUND, None, DEFAULT_LIMITS)
