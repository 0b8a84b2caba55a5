"""aggregator.presence: a revoked device stays known but is never online, asked or waited for."""

from __future__ import annotations

import time

from aggregator.config import AggregatorConfig
from aggregator.presence import Presence
from fedge.envelopes import DeviceState, DeviceStatus


def online(device: str) -> DeviceStatus:
    return DeviceStatus(device, DeviceState.ONLINE, ts=time.time())


def test_a_revoked_device_is_not_online_and_not_selected_until_enrolled_again() -> None:
    # Prepare: five devices online, three asked per round
    presence = Presence(AggregatorConfig(clients_per_round=3, target_devices=3))
    for d in ("a", "b", "c", "d", "e"):
        presence.update(d, online(d))

    # Execute: d is revoked, and its retained "online" status arrives again
    newly = presence.set_revoked({"d", "never-seen"})
    presence.update("d", online("d"))
    picks = [presence.select(r) for r in range(20)]

    # Assert
    assert newly == {"d"}  # only known devices are reported
    assert presence.online == {"a", "b", "c", "e"}
    assert "d" in presence.known  # it did announce itself: the round's count of known holds
    assert all(p is not None and len(p) == 3 and "d" not in p for p in picks)
    # enrolled again: online at its next status
    assert presence.set_revoked(set()) == set()
    presence.update("d", online("d"))
    assert presence.online == {"a", "b", "c", "d", "e"}
