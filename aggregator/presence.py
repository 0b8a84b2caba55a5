"""Which devices the service knows, which are online, whom a round asks and waits for.

Built from the devices' retained statuses only (docs/architecture.md, "Known limits"): a
device that never announced itself is never selected, and a round closes early only once
``target_devices`` devices are known and every online device asked has answered.

A device whose key was revoked stays known (it did announce itself) but is never online nor
selected again, whatever its statuses say: a mutual-TLS device stays connected after its
revocation (the CRL is checked at the handshake only) and its retained status keeps saying
online, so waiting for it would cost every round its full ``round_timeout``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection

import numpy.random as npr

from aggregator.config import AggregatorConfig
from aggregator.keyring import KeyRing
from aggregator.selection import select_clients
from fedge.envelopes import DeviceState, DeviceStatus, RoundTask
from fedge.transport.base import Cancellable, Loop

__all__ = ["Presence", "RevocationWatch"]

log = logging.getLogger(__name__)

# How often the key registry is looked at for revocations (two stat calls when nothing changed).
KEY_WATCH_INTERVAL = 1.0


class Presence:
    def __init__(self, config: AggregatorConfig) -> None:
        self.config = config
        self.known: set[str] = set()
        self.online: set[str] = set()
        self.statuses: dict[str, DeviceStatus] = {}  # the last one of each device
        self.revoked: frozenset[str] = frozenset()

    def update(self, device: str, status: DeviceStatus) -> None:
        self.known.add(device)
        self.statuses[device] = status
        if status.state == DeviceState.OFFLINE or device in self.revoked:
            self.online.discard(device)
        else:
            self.online.add(device)

    def set_revoked(self, revoked: Collection[str]) -> set[str]:
        """Take the devices whose keys are revoked now; those newly revoked and known.

        A device enrolled again (a new key) leaves the set and is online at its next status.
        """
        newly = set(revoked) - self.revoked
        self.revoked = frozenset(revoked)
        self.online -= self.revoked
        return newly & self.known

    def select(self, round_id: int) -> tuple[str, ...] | None:
        """A seeded sample of known devices; None (everyone) until enough devices are known."""
        c = self.config
        if c.clients_per_round is None or len(self.known - self.revoked) <= c.clients_per_round:
            return None
        rng = npr.default_rng([c.selection_seed, round_id])
        return (
            select_clients(
                sorted(self.known - self.revoked),
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


class RevocationWatch:
    """Looks at the key registry every ``KEY_WATCH_INTERVAL`` seconds and drops devices whose
    key was revoked from every round's wait: ``clear_status(device)`` deletes the retained
    status it left, ``changed()`` lets the round close early if it waited only for them."""

    def __init__(
        self,
        presence: Presence,
        keyring: KeyRing,
        loop: Loop,
        clear_status: Callable[[str], None],
        changed: Callable[[], None],
    ) -> None:
        self.presence, self.keyring, self.loop = presence, keyring, loop
        self.clear_status, self.changed = clear_status, changed
        self._timer: Cancellable | None = None

    @property
    def started(self) -> bool:
        return self._timer is not None

    def look(self) -> None:
        """Look now, then again after the interval."""
        for device in sorted(self.presence.set_revoked(self.keyring.revoked_devices)):
            log.warning("%s: its key was revoked; no round waits for it any more", device)
            self.clear_status(device)
        self.changed()
        self._timer = self.loop.call_later(KEY_WATCH_INTERVAL, self.look)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
