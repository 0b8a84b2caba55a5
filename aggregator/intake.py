"""Taking one update into a round: validate, journal, confirm, fold, account.

The order is the contract (docs/protocol.md §9, §10.2): the boundary checks of
``validate_update`` first; then the fsynced journal append and the receipt, before the
update is folded and before the session acknowledges it to the broker (the role's handler
returns after this); then the round's bookkeeping. A refused update is counted per reason
and logged, and changes nothing else.

Both the aggregator service and the shard workers take updates through this one intake; the
round (``RoundContext``) says where an update goes: the service folds into its strategy, a
worker into its clipped weighted sum. A caller with a case of its own between the checks and
the journal (a worker holds an update whose round is ahead, refuses one after the round was
sealed) calls the steps ``parse``, ``check`` and ``take`` itself. Runs on the role's loop.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from aggregator.journal import RoundJournal
from aggregator.keyring import KeyRing
from aggregator.metrics import MetricsSink
from aggregator.rounds import OpenRound, RoundContext
from aggregator.validation import Accepted, validate_update
from fedge.envelopes import ModelUpdate, Receipt
from fedge.errors import AggregationError, ProtocolError
from fedge.limits import Limits
from fedge.support.faults import crash_point
from fedge.topics import Topics
from fedge.transport.base import RoleSession

__all__ = ["Checked", "UpdateIntake"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checked:
    """An update that passed the checks, with the accepted round it answers."""

    answered: OpenRound
    accepted: Accepted


class UpdateIntake:
    def __init__(
        self,
        *,
        session: RoleSession,
        topics: Topics,
        journal: RoundJournal,
        metrics: MetricsSink,
        limits: Limits,
        max_num_samples: int,
        keyring: KeyRing | None,
        name: str = "",
    ) -> None:
        self.session = session
        self.topics = topics
        self.journal = journal
        self.metrics = metrics
        self.limits = limits
        self.max_num_samples = max_num_samples
        self.keyring = keyring
        self._prefix = f"{name}: " if name else ""

    def reject(
        self, rnd: OpenRound | None, reason: str, detail: str, device: str | None = None
    ) -> None:
        self.metrics.reject(reason, device=device)
        if rnd is not None:
            rnd.rejected[reason] = rnd.rejected.get(reason, 0) + 1
        log.warning("%srejected update: %s: %s", self._prefix, reason, detail)

    def receipt(self, device: str, round_id: int, update_id: str) -> None:
        """Tell the device its update is recorded: it may now drop it from its outbox."""
        msg = Receipt(device, round_id, update_id).to_bytes()
        self.session.publish(self.topics.receipt(device), msg, qos=1)

    def uncount(self, journaled: list[tuple[str, bytes]], ctx: RoundContext) -> None:
        """Async restart: journaled updates are in no version yet, though the checkpoint may
        list them as counted (written while they waited in the buffer): let the replay fold
        them again instead of calling them duplicates of themselves."""
        for device, payload in journaled:
            try:
                upd = ModelUpdate.from_bytes(payload, self.limits)
            except ProtocolError:
                continue
            rnd = ctx.answered(upd.round)
            if rnd is not None and rnd.counted.get(device) == upd.update_id:
                del rnd.counted[device]

    def fold(self, device: str, payload: bytes, ctx: RoundContext, *, journal: bool) -> bool:
        """Take ``payload`` into ``ctx.building`` as an answer to the accepted round it names.
        ``journal=False`` replays an update already in the journal. True if it counts."""
        upd = self.parse(device, payload, ctx)
        if upd is None:
            return False
        checked = self.check(device, upd, ctx, journal=journal)
        if checked is None:
            return False
        return self.take(device, payload, checked, ctx, journal=journal)

    def parse(self, device: str, payload: bytes, ctx: RoundContext) -> ModelUpdate | None:
        try:
            return ModelUpdate.from_bytes(payload, self.limits)
        except ProtocolError as e:
            self.reject(ctx.building, e.reason, e.detail, device)
            return None

    def check(
        self, device: str, upd: ModelUpdate, ctx: RoundContext, *, journal: bool
    ) -> Checked | None:
        """The boundary checks against the round ``upd`` answers; None when refused."""
        answered = ctx.answered(upd.round)
        if answered is None:
            self.reject(ctx.building, "too_stale", f"{device}: round no longer accepted", device)
            return None
        try:
            acc = validate_update(
                device,
                upd,
                answered,
                ctx.spec,
                self.limits,
                self.max_num_samples,
                self.keyring,
                max_weight=ctx.max_weight,
            )
        except ProtocolError as e:
            self.reject(answered, e.reason, e.detail, device)
            if (
                e.reason == "duplicate"
                and journal
                and answered.counted.get(device) == upd.update_id
            ):
                # A resend of the update we counted (its receipt was lost): confirm it again.
                self.receipt(device, upd.round, upd.update_id)
            return None
        return Checked(answered, acc)

    def take(
        self, device: str, payload: bytes, checked: Checked, ctx: RoundContext, *, journal: bool
    ) -> bool:
        """Journal and confirm a checked update, fold it into ``ctx.sink``, account for it."""
        answered, acc = checked.answered, checked.accepted
        if journal:
            # Durable before counted and before acked; an OSError propagates, so the session
            # leaves the message unacked and the broker redelivers it.
            crash_point("before_journal")
            t0 = time.perf_counter()
            self.journal.append(device, payload)
            self.metrics.timing("journal_append", time.perf_counter() - t0)
            crash_point("after_journal")
            self.receipt(device, acc.update.round, acc.update.update_id)
        if acc.clamped:
            self.metrics.event("clamped_samples")
        staleness = ctx.staleness(answered)
        try:
            ctx.sink.fold(acc.delta, acc.weight, staleness=staleness)
        except AggregationError as e:
            # Deterministic: a replay of the journal rejects it the same way.
            self.reject(answered, "aggregation", f"{device}: {e}", device)
            return False
        building = ctx.building
        answered.counted[device] = acc.update.update_id
        building.folded.append((device, answered.round, acc.update.update_id, staleness))
        if building.calib is not None and acc.update.calib:
            try:
                building.calib.add(acc.update.calib)
            except ProtocolError as e:
                # The weights still count; only the ranges are refused.
                self.reject(answered, e.reason, f"{device}: calibration ranges: {e.detail}", device)
        building.account(
            acc.num_samples, acc.update.metrics, answered.task.hyper.epochs, weight=acc.weight
        )
        self.metrics.accept(
            device=device, staleness=staleness, base_version=answered.task.base_version
        )
        return True
