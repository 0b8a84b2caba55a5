"""Taking one update into a round: validate, journal, confirm, fold, account.

The order is the contract (docs/protocol.md §9, §10.2): the boundary checks of
``validate_update`` first; then the fsynced journal append and the receipt, before the
strategy folds it and before the session acknowledges it to the broker (the service's
handler returns after this); then the round's bookkeeping. A refused update is counted per
reason and logged, and changes nothing else. Runs on the service's mux thread.
"""

from __future__ import annotations

import logging

from aggregator.journal import RoundJournal
from aggregator.keyring import KeyRing
from aggregator.metrics import MetricsLog
from aggregator.rounds import OpenRound
from aggregator.strategies.base import Strategy
from aggregator.validation import validate_update
from fedge.envelopes import ModelUpdate, Receipt
from fedge.errors import AggregationError, ProtocolError
from fedge.limits import Limits
from fedge.support.faults import crash_point
from fedge.tensors import TensorSpec
from fedge.topics import Topics
from fedge.transport.session import Session

__all__ = ["UpdateIntake"]

log = logging.getLogger(__name__)


class UpdateIntake:
    def __init__(
        self,
        *,
        session: Session,
        topics: Topics,
        journal: RoundJournal,
        metrics: MetricsLog,
        strategy: Strategy,
        limits: Limits,
        max_num_samples: int,
        keyring: KeyRing | None,
    ) -> None:
        self.session = session
        self.topics = topics
        self.journal = journal
        self.metrics = metrics
        self.strategy = strategy
        self.limits = limits
        self.max_num_samples = max_num_samples
        self.keyring = keyring

    def reject(self, rnd: OpenRound | None, reason: str, detail: str) -> None:
        self.metrics.reject(reason)
        if rnd is not None:
            rnd.rejected[reason] = rnd.rejected.get(reason, 0) + 1
        log.warning("rejected update: %s: %s", reason, detail)

    def receipt(self, device: str, round_id: int, update_id: str) -> None:
        """Tell the device its update is recorded: it may now drop it from its outbox."""
        msg = Receipt(device, round_id, update_id).to_bytes()
        self.session.publish(self.topics.receipt(device), msg, qos=1)

    def uncount(self, journaled: list[tuple[str, bytes]], recent: dict[int, OpenRound]) -> None:
        """Async restart: journaled updates are in no version yet, though the checkpoint may
        list them as counted (written while they waited in the buffer): let the replay fold
        them again instead of calling them duplicates of themselves."""
        for device, payload in journaled:
            try:
                upd = ModelUpdate.from_bytes(payload, self.limits)
            except ProtocolError:
                continue
            rnd = recent.get(upd.round)
            if rnd is not None and rnd.counted.get(device) == upd.update_id:
                del rnd.counted[device]

    def fold(
        self,
        device: str,
        payload: bytes,
        *,
        building: OpenRound,
        recent: dict[int, OpenRound] | None,
        version: int,
        spec: TensorSpec,
        journal: bool,
    ) -> bool:
        """Take ``payload`` into ``building`` (the round whose version it goes into) as an
        answer to its own round: ``building`` itself in sync mode (``recent`` None), in async
        mode the still-accepted round of ``recent`` it names. ``journal=False`` replays an
        update already in the journal. True if it counts."""
        try:
            upd = ModelUpdate.from_bytes(payload, self.limits)
        except ProtocolError as e:
            self.reject(building, e.reason, e.detail)
            return False
        answered = building if recent is None else recent.get(upd.round)
        if answered is None:
            self.reject(building, "too_stale", f"{device}: round no longer accepted")
            return False
        try:
            acc = validate_update(
                device,
                upd,
                answered,
                spec,
                self.limits,
                self.max_num_samples,
                self.keyring,
            )
        except ProtocolError as e:
            self.reject(answered, e.reason, e.detail)
            if (
                e.reason == "duplicate"
                and journal
                and answered.counted.get(device) == upd.update_id
            ):
                # A resend of the update we counted (its receipt was lost): confirm it again.
                self.receipt(device, upd.round, upd.update_id)
            return False
        if journal:
            # Durable before counted and before acked; an OSError propagates, so the session
            # leaves the message unacked and the broker redelivers it.
            crash_point("before_journal")
            self.journal.append(device, payload)
            crash_point("after_journal")
            self.receipt(device, acc.update.round, acc.update.update_id)
        if acc.clamped:
            self.metrics.event("clamped_samples")
        staleness = version - answered.task.base_version
        try:
            self.strategy.fold(acc.delta, acc.num_samples, staleness=staleness)
        except AggregationError as e:
            # Deterministic: a replay of the journal rejects it the same way.
            self.reject(answered, "aggregation", f"{device}: {e}")
            return False
        answered.counted[device] = acc.update.update_id
        building.folded.append((device, answered.round, acc.update.update_id, staleness))
        if building.calib is not None and acc.update.calib:
            try:
                building.calib.add(acc.update.calib)
            except ProtocolError as e:
                # The weights still count; only the ranges are refused.
                self.reject(answered, e.reason, f"{device}: calibration ranges: {e.detail}")
        building.account(acc.num_samples, acc.update.metrics, answered.task.hyper.epochs)
        self.metrics.accepted += 1
        return True
