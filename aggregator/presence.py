"""Which devices the service knows, which are online, whom a round asks and waits for.

Built from the devices' retained statuses only (docs/architecture.md, "Known limits"): a
device that never announced itself is never selected, and a round closes early only once
``target_devices`` devices are known and every online device asked has answered.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy.random as npr

from aggregator.config import AggregatorConfig
from aggregator.selection import select_clients
from fedge.envelopes import DeviceState, DeviceStatus, RoundTask

__all__ = ["Presence"]


class Presence:
    def __init__(self, config: AggregatorConfig) -> None:
        self.config = config
        self.known: set[str] = set()
        self.online: set[str] = set()
        self.statuses: dict[str, DeviceStatus] = {}  # the last one of each device

    def update(self, device: str, status: DeviceStatus) -> None:
        self.known.add(device)
        self.statuses[device] = status
        if status.state == DeviceState.OFFLINE:
            self.online.discard(device)
        else:
            self.online.add(device)

    def select(self, round_id: int) -> tuple[str, ...] | None:
        """A seeded sample of known devices; None (everyone) until enough devices are known."""
        c = self.config
        if c.clients_per_round is None or len(self.known) <= c.clients_per_round:
            return None
        rng = npr.default_rng([c.selection_seed, round_id])
        return (
            select_clients(
                sorted(self.known),
                self.online,
                count=c.clients_per_round,
                over_select=c.over_select,
                rng=rng,
            )
            or None
        )

    def target(self, task: RoundTask | None) -> int:
        """How many counted updates close the round: the target, or fewer when it asks fewer."""
        c = self.config
        if task is not None and task.selected is not None:
            return min(c.target_devices, c.clients_per_round or 10**9, len(task.selected))
        return c.target_devices

    def all_answered(self, task: RoundTask, counted: Collection[str]) -> bool:
        """Every expected device has announced itself and every online one asked answered:
        waiting for the deadline gains nothing."""
        if len(self.known) < self.target(task):
            return False  # an expected device has not announced itself yet: it may answer
        waiting = {d for d in self.online if task.asks(d)} - set(counted)
        return not waiting
