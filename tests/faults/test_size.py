"""Size discipline: an update over the packet limit is refused before it is sent (no resend
loop), and a model over ``model_chunk_bytes`` travels in chunks, also across a broker crash."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
from paho.mqtt.client import CallbackAPIVersion, Client
from paho.mqtt.enums import MQTTProtocolVersion

from aggregator.registry import ModelRegistry
from fedge.limits import MAX_PACKET_SIZE
from simulation.broker import MosquittoBroker
from simulation.datasets import FederatedData
from tests.integration.fleet_helpers import wait_until

pytestmark = [pytest.mark.faults, pytest.mark.integration]

# mlp 65536-64-64-10: 4,199,178 float32 parameters, a 16.8 MB fp32 delta: over the 16 MiB
# packet limit. Its ONNX file is as large, so the model itself must be chunked.
WIDE = 65536


def _wide_data() -> FederatedData:
    rng = np.random.default_rng(0)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.standard_normal((n, WIDE), dtype=np.float32), rng.integers(0, 10, n)

    return FederatedData("wide", WIDE, 10, (split(16),), split(8))


def _disconnects(broker: MosquittoBroker, client: str) -> int:
    return broker.log_path.read_text(errors="replace").count(f"Client {client} disconnected")


def _naive_oversize_publisher(broker: MosquittoBroker, seconds: float) -> int:
    """What the issue measured: paho itself publishes a too-large packet, the broker drops the
    connection, paho reconnects and sends it again. Returns the disconnects seen."""
    c = Client(
        CallbackAPIVersion.VERSION2, client_id="dev-naive", protocol=MQTTProtocolVersion.MQTTv5
    )
    c.username_pw_set("dev-naive")
    c.connect(broker.host, broker.port)
    c.loop_start()
    try:
        c.publish("fedge/naive/update/dev-naive", bytes(MAX_PACKET_SIZE), qos=1)
        time.sleep(seconds)
    finally:
        c.disconnect()
        c.loop_stop()
    return _disconnects(broker, "dev-naive")


def test_oversize_update_is_refused_before_sending(
    fresh_broker: MosquittoBroker, local_factory: Any
) -> None:
    # Prepare: one device, a model whose fp32 delta exceeds the packet limit.
    fleet = local_factory(
        fresh_broker, _wide_data(), target_devices=1, min_devices=1, round_timeout=4
    )
    agg = fleet.start_aggregator()
    agent = fleet.add_agent(0)

    # Execute: round 1 is trained; the update cannot be sent; the round ends at its deadline.
    wait_until(lambda: agent.store.last_round() == 1, 120, "dev-0 to give up round 1")
    wait_until(lambda: agg.failed_rounds >= 1, 30, "round 1 to fail at its deadline")
    time.sleep(2.0)  # room for a resend loop to show in the broker log
    naive = _naive_oversize_publisher(fresh_broker, 4.0)

    # Assert: the device assembled the chunked model, refused its own update up front, stayed
    # connected; the round failed with its reason instead of waiting.
    registry = ModelRegistry(fleet.config.state_dir / "models")
    onnx = registry.path(0).read_bytes()
    assert len(onnx) > fleet.config.model_chunk_bytes
    assert agent.model is not None
    assert agent.model.onnx == onnx
    assert agent.counters.updates_sent == 0
    assert agent.counters.tx_bytes == 0  # nothing of it went on the wire
    assert len(agent.outbox) == 0  # refused for good, not left to be resent after a reboot
    assert agent.store.acked() == []
    assert agent.session.connects == 1
    assert _disconnects(fresh_broker, "dev-0") == 0
    assert "quorum not met: 0 of 1" in fleet.records()[0]["failed"]
    fleet.notes.update(
        model_bytes=len(onnx),
        chunks=-(-len(onnx) // fleet.config.model_chunk_bytes),
        fedge_disconnects=0,
        naive_paho_disconnects_4s=naive,
    )
    assert naive >= 2  # the loop fedge avoids is real


def test_chunked_model_survives_a_broker_sigkill(
    fresh_broker: MosquittoBroker, local_factory: Any, digits4: FederatedData
) -> None:
    # Prepare: ~42 kB models sent as 8 kB chunks, retained.
    fleet = local_factory(
        fresh_broker,
        digits4,
        rounds=3,
        target_devices=2,
        min_devices=2,
        round_timeout=60,
        model_chunk_bytes=8192,
    )
    agg = fleet.start_aggregator()
    agents = [fleet.add_agent(i) for i in range(2)]
    fleet.wait_versions(1, 60)

    # Execute: SIGKILL the broker, back after 1 s; a new device joins once the fleet is done.
    fleet.bounce_broker(fresh_broker)
    fleet.wait_versions(3, 90)
    wait_until(
        lambda: all(a.model is not None and a.model.version == 3 for a in agents),
        30,
        "v3 at the fleet's devices (so it is what the broker retains)",
    )
    late = fleet.add_agent(2)

    # Assert: everyone holds v3, assembled from retained chunks the restarted broker kept.
    final = ModelRegistry(fleet.config.state_dir / "models").path(3).read_bytes()
    assert len(final) > 4 * 8192
    wait_until(
        lambda: all(a.model is not None and a.model.version == 3 for a in [*agents, late]),
        30,
        "v3 on every device",
    )
    assert all(a.model is not None and a.model.onnx == final for a in [*agents, late])
    assert agg.publisher._chunks_published == -(-len(final) // 8192)
    fleet.notes.update(model_bytes=len(final), chunks=agg.publisher._chunks_published)
    out = fleet.outcome()
    assert (out.versions, out.lost, out.double_counted) == (3, 0, 0)
