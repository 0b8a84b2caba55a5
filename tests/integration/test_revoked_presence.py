"""A revoked device leaves every round's wait at once (issue 12, identity operations).

Seen in the field: after ``fedge revoke``, every later round waited its full ``round_timeout``
because the revoked device stayed connected (mutual TLS checks the CRL at the handshake only)
and its retained status still said online. Here the devices keep their connections, as such
a device does, and only the key registry changes.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.client import CallbackAPIVersion, Client

from fedge.key_registry import KeyRegistry
from simulation.datasets import make_federated
from simulation.keys import SimKeys
from tests.integration.fleet_helpers import wait_until

pytestmark = pytest.mark.integration

ROUND_TIMEOUT = 30.0


def test_revoked_device_leaves_the_next_rounds_target(fleet_factory: Any, tmp_path: Path) -> None:
    # Prepare: three signing devices, a round needs all three to close before its deadline
    keys = SimKeys.make(tmp_path / "keys", 3)
    registry = KeyRegistry(keys.registry)
    for i in range(3):  # the fleet's devices are dev-0..dev-2
        (keys.registry / "devices" / f"dev-{i:04d}.pub").rename(
            keys.registry / "devices" / f"dev-{i}.pub"
        )
    fleet = fleet_factory(
        make_federated("digits", 3, "iid", seed=0),
        rounds=3,
        target_devices=3,
        min_devices=2,
        round_timeout=ROUND_TIMEOUT,
        device_keys=keys.registry,
        signing_key=keys.aggregator_key,
    )
    cleared = threading.Event()
    watcher = Client(CallbackAPIVersion.VERSION2, client_id=f"watch-{fleet.topics.fleet}")
    watcher.on_message = lambda _c, _u, m: cleared.set() if not m.payload else None
    watcher.username_pw_set("monitor")  # the ACL lets only it and the aggregator read statuses
    watcher.connect(fleet.url.host, fleet.url.port)
    watcher.subscribe(fleet.topics.status("dev-2"), qos=1)
    watcher.loop_start()
    try:
        fleet.start_aggregator()
        for i in range(3):
            fleet.add_agent(
                i, signing_key=keys.device_keys[i], aggregator_key=keys.aggregator_key_pub
            )
        wait_until(lambda: fleet.aggregator.version >= 1, 30, "v1 from all three devices")
        assert fleet.aggregator.online == {"dev-0", "dev-1", "dev-2"}
        # Execute: revoke dev-2 (its key only: its connection and its status stay)
        registry.retire("dev-2")
        revoked_at = time.monotonic()
        wait_until(lambda: fleet.aggregator.done.is_set(), ROUND_TIMEOUT, "v3")
        took = time.monotonic() - revoked_at
        # Assert: the rounds after the revocation closed on the two others, well before
        # their deadlines; dev-2's retained status was cleared and it counts as offline
        assert took < ROUND_TIMEOUT / 3, f"{took:.1f} s for two rounds after the revocation"
        assert all(set(r["counted"]) == {"dev-0", "dev-1"} for r in fleet.records[1:])
        assert cleared.wait(5), "dev-2's retained status was not cleared"
        assert "dev-2" not in fleet.aggregator.online
    finally:
        watcher.loop_stop()
        watcher.disconnect()
