"""Signatures and hostile payloads end to end, over a real Mosquitto, while an honest round
completes: forged, unsigned, replayed, oversized and malformed updates are each refused with
their reason counted; agents refuse forged and downgraded models and keep theirs."""

from __future__ import annotations

import hashlib
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zstandard
from paho.mqtt.client import CallbackAPIVersion, Client
from paho.mqtt.enums import MQTTProtocolVersion

from fedge.envelopes import GlobalModel
from fedge.identity import SigningKey
from simulation.datasets import FederatedData, make_federated
from simulation.keys import SimKeys
from tests.integration.fleet_helpers import update_for, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def digits3() -> FederatedData:
    return make_federated("digits", 3, "iid", seed=0)


def signed_update(agg: Any, key: SigningKey | None, device: str, task: Any, **over: Any) -> bytes:
    return update_for(agg.weights, device, task, key, **over)


def test_hostile_updates_are_refused_while_an_honest_round_completes(
    fleet_factory: Any, digits3: FederatedData, tmp_path: Path
) -> None:
    keys = SimKeys.make(tmp_path / "keys", 4)  # dev-0000 .. dev-0003 enrolled
    fleet = fleet_factory(
        digits3,
        rounds=1,
        target_devices=2,
        min_devices=2,
        round_timeout=30,
        device_keys=keys.registry,
        signing_key=keys.aggregator_key,
    )
    fleet.start_aggregator()
    agg = fleet.aggregator
    honest, mallory = fleet.raw_device("dev-0000"), fleet.raw_device("dev-0001")
    task = honest.wait_task(1)
    k0, k1 = keys.device_keys[0], keys.device_keys[1]
    bomb = zstandard.ZstdCompressor().compress(bytes(64 * 1024 * 1024))
    nested = b"\x91" * 100_000 + b"\xc0"
    try:
        mallory.send(signed_update(agg, None, "dev-0001", task))  # unsigned
        mallory.send(signed_update(agg, k0, "dev-0001", task))  # signed with another's key
        mallory.send(signed_update(agg, k1, "dev-0001", task, nonce=bytes(16)))  # wrong nonce
        mallory.send(signed_update(agg, k1, "dev-0001", task, round=task.round + 5))
        mallory.send(msgpack.packb({"v": 1, "kind": "update"}, use_bin_type=True)[:-1])
        mallory.send(nested)
        mallory.send(msgpack.packb(msgpack.ExtType(1, b"x")))
        mallory.send(signed_update(agg, k1, "dev-0001", task, codec="fp32+zstd", delta=bomb))
        wait_until(lambda: sum(agg.metrics.rejected.values()) >= 8, 20, "eight rejections")
        assert agg.version == 0

        honest.send(signed_update(agg, k0, "dev-0000", task))
        mallory.send(signed_update(agg, k1, "dev-0001", task, num_samples=10**9))

        wait_until(agg.done.is_set, 20, "the honest round to complete")
    finally:
        honest.close()
        mallory.close()
    r = dict(agg.metrics.rejected)
    assert r.pop("unsigned") == 1
    assert r.pop("bad_signature") == 1
    assert r.pop("bad_nonce") == 1
    assert r.pop("wrong_round") == 1
    assert r.pop("bad_msgpack") == 3  # truncated, deeply nested, ExtType
    assert r.pop("wrong_codec") == 1 or r.pop("too_large") == 1
    assert agg.metrics.events["clamped_samples"] == 1
    assert fleet.records[0]["devices"] == 2
    assert fleet.records[0]["samples"] == 10 + agg.config.max_num_samples


def _publish_retained(host: str, port: int, topic: str, payload: bytes) -> None:
    c = Client(
        CallbackAPIVersion.VERSION2, client_id="aggregator", protocol=MQTTProtocolVersion.MQTTv5
    )
    c.username_pw_set("aggregator")  # the local ACL lets this identity publish models
    c.connect(host, port)
    c.loop_start()
    c.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)
    c.disconnect()
    c.loop_stop()


def test_agent_refuses_forged_and_downgraded_models(
    fleet_factory: Any, digits3: FederatedData, tmp_path: Path
) -> None:
    keys = SimKeys.make(tmp_path / "keys", 3)
    fleet = fleet_factory(
        digits3,
        rounds=2,
        target_devices=3,
        min_devices=3,
        round_timeout=30,
        device_keys=keys.registry,
        signing_key=keys.aggregator_key,
    )
    fleet.start_aggregator()
    agents = [
        fleet.add_agent(i, signing_key=keys.device_keys[i], aggregator_key=keys.aggregator_key_pub)
        for i in range(3)
    ]
    # Devices here are dev-0..dev-2 while the registry enrolled dev-0000..: re-enroll them.
    for i in range(3):
        (keys.registry / "devices" / f"dev-{i:04d}.pub").rename(
            keys.registry / "devices" / f"dev-{i}.pub"
        )
    wait_until(fleet.aggregator.done.is_set, 60, "two signed versions")
    a = agents[0]
    wait_until(lambda: a.model is not None and a.model.version == 2, 10, "v2 on the device")
    held = a.model
    rejected = a.counters.models_rejected
    good = GlobalModel.from_bytes(fleet.aggregator.publisher.message)
    forged_onnx = fleet.aggregator.registry.path(0).read_bytes()
    forged = replace(
        good, version=3, onnx=forged_onnx, sha256=hashlib.sha256(forged_onnx).hexdigest()
    )
    mallory_key = SigningKey.generate()
    url = fleet.url

    for bad in (
        forged,  # signature of v2 over another model
        replace(forged, signature=mallory_key.sign(forged.digest())),  # wrong key
        replace(forged, signature=b""),  # unsigned
        GlobalModel.from_bytes(
            fleet.aggregator.registry.path(1).read_bytes() and fleet.aggregator.publisher.message
        ),  # same, idempotent
    ):
        _publish_retained(url.host, url.port, fleet.topics.model, bad.to_bytes())
    time.sleep(1.0)

    assert a.model == held
    assert a.counters.models_rejected >= rejected + 3
