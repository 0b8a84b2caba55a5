"""Attack: forged model chunks and manifests (issue 17, item 2), over a real Mosquitto.

Before the fix one chunk naming version 2^31 made every agent track that version and ignore
every real one (stuck at its model while the aggregator moved on), and chunks were buffered up
to ``max_model_bytes`` (1 GiB) before any manifest. Here the forger publishes, as the local
profile lets anyone do (it connects as ``aggregator``), a forged manifest and 24 MiB of forged
chunks of version 2^31, retained, before the fleet starts; then the fleet must train as usual,
and the agents must drop the forged chunks once they know the real model's size.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from paho.mqtt.client import CallbackAPIVersion, Client
from paho.mqtt.enums import MQTTProtocolVersion

from fedge.chunks import FIRST_EARLY_BYTES
from fedge.envelopes import GlobalModel, ModelArch, ModelChunk
from fedge.identity import SigningKey, load_signing_key, save_signing_key
from simulation.broker import MosquittoBroker
from simulation.datasets import FederatedData, make_federated
from tests.integration.fleet_helpers import Fleet, wait_until

pytestmark = pytest.mark.integration

FORGED_VERSION = 2**31
FORGED_CHUNKS = 24
CHUNK = 1024 * 1024


def _forge(fleet: Fleet, arch: ModelArch) -> None:
    """Retained, as ``aggregator`` (the local profile checks no password)."""
    c = Client(CallbackAPIVersion.VERSION2, "aggregator", protocol=MQTTProtocolVersion.MQTTv5)
    c.username_pw_set("aggregator")
    c.connect(fleet.url.host, fleet.url.port)
    c.loop_start()
    sha = hashlib.sha256(b"forged").hexdigest()
    manifest = GlobalModel(
        FORGED_VERSION, arch, b"", sha, 1.0, {}, chunks=FORGED_CHUNKS, size=FORGED_CHUNKS * CHUNK
    )
    msgs = [(fleet.topics.model, manifest.to_bytes())]
    for i in range(FORGED_CHUNKS):
        chunk = ModelChunk(FORGED_VERSION, i, FORGED_CHUNKS, sha, bytes([i]) * CHUNK)
        msgs.append((fleet.topics.model_chunk(100 + i), chunk.to_bytes()))
    for topic, payload in msgs:
        c.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    c.disconnect()
    c.loop_stop()


def test_forged_chunks_and_manifests_neither_stall_nor_bloat_agents(
    fresh_broker: MosquittoBroker, tmp_path: Path
) -> None:
    # Prepare: models signed by the aggregator, ~42 kB in 8 kB chunks; the forgery retained
    data: FederatedData = make_federated("digits", 3, "iid", seed=0)
    save_signing_key(tmp_path / "aggregator.key", SigningKey.generate())
    aggregator_pub = load_signing_key(tmp_path / "aggregator.key").verify_key
    fleet = Fleet(
        fresh_broker,
        tmp_path,
        data,
        rounds=2,
        target_devices=3,
        min_devices=3,
        round_timeout=20,
        model_chunk_bytes=8192,
        signing_key=tmp_path / "aggregator.key",
    )
    try:
        _forge(fleet, ModelArch("mlp", data.input_dim, data.num_classes))
        # Execute: agents first (they get the forgery on subscribing), then the aggregator
        agents = [fleet.add_agent(i, aggregator_key=aggregator_pub) for i in range(3)]
        wait_until(lambda: all(a.counters.models_rejected >= 1 for a in agents), 10, "forgery seen")
        buffered = [a.models._assembler.buffered_bytes for a in agents]
        fleet.start_aggregator()
        wait_until(fleet.aggregator.done.is_set, 30, "two versions despite the forgery")
        wait_until(
            lambda: all(a.model is not None and a.model.version == 2 for a in agents),
            10,
            "devices to hold v2",
        )
    finally:
        fleet.close()
    # Assert: every agent holds the real v2; what the forgery made them hold was bounded
    # (64 MiB while they knew no model), and dropped once they knew the model's size
    final = fleet.aggregator.registry.path(2).read_bytes()
    assert all(a.model is not None and a.model.onnx == final for a in agents)
    assert all(b <= FIRST_EARLY_BYTES for b in buffered), buffered
    assert all(a.models._assembler.buffered_bytes <= 2 * len(final) for a in agents)
    assert all(a.models._assembler.evicted >= 1 for a in agents)
