"""A shard worker's intake: the retained model and task, opening its share of a round, and the
fleet's updates through the aggregator's own intake; an update whose round is ahead is held,
one after the seal refused.

A part of ``ShardWorker`` (``aggregator.sharded.worker_base``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aggregator.rounds import OpenRound, RoundContext
from aggregator.sharded.clipped_sum import ClippedSum
from aggregator.sharded.partials import PartialRequest
from aggregator.sharded.worker_base import WorkerBase
from aggregator.sharded.worker_base import worker_log as log
from aggregator.weighting import lower_median
from fedge.envelopes import GlobalModel, RoundTask
from fedge.errors import ProtocolError
from fedge.task_check import check_task
from fedge.tensors import spec_of
from fedge.transport.mqtt import publish_packet_size

__all__ = ["WorkerIntake"]


class WorkerIntake(WorkerBase):
    # -- incoming ---------------------------------------------------------------------------
    def _on_message(self, topic: str, payload: bytes) -> None:
        device = self.topics.device_of(topic, "update")
        if device is not None:
            self._on_update(device, topic, payload)
            return
        try:
            if topic == self.topics.task and not payload:
                return  # the round closed (protocol §10.1): the reducer's request settles it
            if topic == self.topics.task:
                task = RoundTask.from_bytes(payload, self.limits)
                # Verified before it is held: a forged round 2**31 would make every real
                # task look stale and discard the journals of the rounds below it.
                self._task = check_task(task, self.config.aggregator_key, self.limits)
                self._maybe_open()
            elif topic == self.shard_topics.request:
                self._on_request(PartialRequest.from_bytes(payload, self.limits))
            elif self._models.wants(topic):
                self._on_model(self._models.offer(topic, payload))
        except (ProtocolError, ValueError) as e:
            log.warning("%s: ignored %s: %s", self.name, topic, e)

    def _on_model(self, model: GlobalModel | None) -> None:
        if model is None or model.version == self.model_version:
            return
        from models.onnx_weights import read_initializers

        self.spec = spec_of(read_initializers(model.onnx))
        self.model_version = model.version
        self._maybe_open()

    def _maybe_open(self) -> None:
        task, rnd = self._task, self.round
        if task is None or self.spec is None or task.base_version != self.model_version:
            return  # the model this task trains arrives separately
        if rnd is not None and task.round <= rnd.round:
            if task.round == rnd.round and task.deadline != rnd.task.deadline:
                rnd.task = task  # deadline extended after a broker outage
                self._schedule_deadline(task)
            return
        if rnd is not None and rnd.weights:
            self._weight_reference = lower_median(rnd.weights)
        # A newer task means the reducer checkpointed the last round: its journal can go.
        self._settle(task.round)
        self.journal.discard_through(task.round - 1)
        self._excluded = set()
        self._start_round(task)
        self._schedule_deadline(task)
        pending, self._pending = self._pending, []
        for device, payload, ack in pending:
            self._on_update(device, self.topics.update(device), payload, ack)
        self.ready.set()
        log.info("%s: round %d open (base v%d)", self.name, task.round, task.base_version)
        early, self._early = self._early, []
        for req in early:
            if req.round == task.round:
                self._on_request(req)

    def _start_round(self, task: RoundTask) -> None:
        """Fresh state for ``task``, then fold what the journal holds (minus excluded)."""
        assert self.spec is not None
        self.round = OpenRound(task, time.time())
        sink = ClippedSum(self.spec, self.config.clip_norm)
        self._ctx = RoundContext(
            self.round,
            task.base_version,
            self.spec,
            sink,
            max_weight=self._cap.cap(self._weight_reference),
        )
        for device, payload in self.journal.open(task.round):
            if device in self._excluded:
                self.round.counted[device] = "(dropped)"  # later copies are duplicates
            else:
                self._fold(device, payload, journal=False)

    def _schedule_deadline(self, task: RoundTask) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        delay = max(0.0, task.deadline - time.time())
        self._deadline = self.mux.call_later(delay, lambda: self._publish_partial(0, final=False))

    def _on_update(
        self, device: str, topic: str, payload: bytes, ack: Callable[[], None] | None = None
    ) -> None:
        """``ack``: that of a held update taken up now; None for the message being handled
        (the session acks it when the handler returns, unless it is held again)."""
        if self.round is None:
            self._hold(device, payload, ack)
            return
        size = publish_packet_size(topic, len(payload))
        self.round.uplink_bytes += size
        self.intake.metrics.received(device, size)
        if self._fold(device, payload, journal=True, ack=ack) and ack is not None:
            ack()

    def _hold(self, device: str, payload: bytes, ack: Callable[[], None] | None) -> None:
        if len(self._pending) >= self.config.max_pending:
            self._reject("no_round", f"{device}: no round open and {len(self._pending)} held")
            if ack is not None:
                ack()
            return
        self._pending.append((device, payload, ack or self.session.defer_ack()))

    def _fold(
        self, device: str, payload: bytes, *, journal: bool, ack: Callable[[], None] | None = None
    ) -> bool:
        """Validate, journal, confirm and fold one update through the shared intake; False
        when it was held again (its ``ack`` then travels with it), True when it is dealt
        with (counted or refused)."""
        rnd, ctx = self.round, self._ctx
        assert rnd is not None
        assert ctx is not None
        upd = self.intake.parse(device, payload, ctx)
        if upd is None:
            return True
        if upd.round > rnd.round:
            # Its task has not reached this worker yet (possible on a broker cluster).
            self._hold(device, payload, ack)
            return False
        checked = self.intake.check(device, upd, ctx, journal=journal)
        if checked is None:
            return True
        if journal and self._sealed == rnd.round:
            # The reducer closes the round on the sums already sent: no receipt, as for an
            # update that reaches a single aggregator after its round closed.
            self._reject("round_closed", f"{device}: round {rnd.round} is closing")
            return True
        if self.intake.take(device, payload, checked, ctx, journal=journal):
            self.folded += 1
        return True

    def _reject(self, reason: str, detail: str) -> None:
        self.intake.reject(self.round, reason, detail)
