"""The service's round policy when ``shard_workers`` is set: the reducer of shard workers.

The service then reads no updates: the workers validate, journal, confirm and fold them, and
:class:`~aggregator.sharded.rounds.ShardedRound` polls their partial sums and merges them.
This policy decides on each merge: seal the round when the merge meets the target (or, past
the deadline, the quorum, or when every online device asked has answered), close on the
sealed (final) merge, fail it at the deadline short of quorum. The first round waits until
every worker has announced itself: an update published before a worker subscribed would
have no subscriber and be dropped.
"""

from __future__ import annotations

import logging
import time

from aggregator.modes import SyncRounds
from aggregator.parts import RoundParts
from aggregator.rounds import OpenRound
from aggregator.sharded.partials import ShardPolicy, ShardTopics
from aggregator.sharded.reducer import Merged
from aggregator.sharded.rounds import ShardedRound
from aggregator.strategies.streaming import StreamingStrategy
from fedge.envelopes import DeviceState, DeviceStatus
from fedge.tensors import TensorSpec
from fedge.topics import Topics

__all__ = ["ShardedRounds"]

log = logging.getLogger(__name__)


class ShardedRounds(SyncRounds):
    def __init__(self, parts: RoundParts) -> None:
        super().__init__(parts)
        c = self.config
        self.workers_seen: set[str] = set()  # shard workers that announced themselves
        self._final: Merged | None = None  # the sealed merge the round closes on
        self.sharded = ShardedRound(
            parts.topics,
            c.shard_workers,
            self.session,
            parts.loop,
            poll=c.shard_poll,
            limits=parts.limits,
            on_merged=self._on_merged,
            leave_after=c.shard_leave_after,
            # The workers must enforce what this service would: refused otherwise.
            policy=ShardPolicy(
                signed=parts.keyring is not None,
                clip_norm=float(self.strategy.options.clip_norm),
                max_num_samples=c.max_num_samples,
            ),
        )

    @classmethod
    def updates_topic(cls, topics: Topics) -> str:
        return ShardTopics(topics).all_partials

    def handle(self, topic: str, payload: bytes) -> bool:
        return self.sharded.handle(topic, payload)

    def on_status(self, device: str, status: DeviceStatus) -> None:
        if device in self.config.shard_workers:
            self._on_worker_status(device, status)
        else:
            super().on_status(device, status)

    def _on_worker_status(self, worker: str, st: DeviceStatus) -> None:
        # A retained status, online or offline, means the worker's session (and with it its
        # shared subscription) exists: the broker keeps its share of updates meanwhile.
        if st.state == DeviceState.OFFLINE:
            log.warning("shard worker %s is offline; its share waits for it", worker)
        first = worker not in self.workers_seen
        self.workers_seen.add(worker)
        if first and self.round is None and self.session.connected and not self.parts.done.is_set():
            self._open_first_round()

    def _open_first_round(self) -> None:
        missing = sorted(set(self.config.shard_workers) - self.workers_seen)
        if missing:
            log.info("waiting for shard workers %s before the first round", ", ".join(missing))
            return
        self._open_round()

    def _began(self, rnd: OpenRound, spec: TensorSpec) -> None:
        self.sharded.begin(rnd.task, spec)

    def _ended(self) -> None:
        self.sharded.stop()

    def _on_deadline(self) -> None:
        if self.round is None or not self.session.connected:
            return
        self.sharded.request_now()  # _on_merged decides, past the deadline

    def _on_merged(self, m: Merged) -> None:
        """Seal on a merge that meets the target (or, past the deadline, the quorum); close
        on the sealed (final) merge."""
        rnd = self.round
        if rnd is None or m.round != rnd.round:
            return
        c = self.config
        if m.final:
            for gateway in m.left_out:  # a site cut off: its devices get late receipts
                log.warning("round %d closes without %s", rnd.round, gateway)
                self.metrics.event("site_left_out")
            if m.count >= c.min_devices:
                self._final = m
                self._close_round()
            else:  # devices counted twice were counted once: the quorum may go
                self._fail_round(rnd, f"quorum not met: {m.count} of {c.min_devices} (sharded)")
            return
        everyone = self.presence.all_answered(rnd.task, m.counted)
        past_deadline = time.time() >= rnd.task.deadline
        target = self._target()
        if m.count >= target or (m.count >= c.min_devices and (everyone or past_deadline)):
            self.sharded.seal()
        elif past_deadline:
            self._fail_round(
                rnd, f"quorum not met: {m.count} of {c.min_devices} by deadline (sharded)"
            )

    def _gather(self, rnd: OpenRound) -> None:
        """Load the merged sums into the strategy and the round's bookkeeping."""
        m, self._final = self._final, None
        if m is None:
            return
        assert isinstance(self.strategy, StreamingStrategy)
        self.strategy.fold_sum(m.sums, m.total_weight, m.count)
        rnd.counted = dict(m.counted)
        rnd.uplink_bytes = m.uplink_bytes
        rnd.samples = round(m.total_weight)
        rnd.train_loss_sum = m.loss_sum
        for reason, n in m.rejected.items():
            rnd.rejected[reason] = rnd.rejected.get(reason, 0) + n
            self.metrics.reject(reason, n)
        rnd.folded = [(d, rnd.round, u, 0) for d, u in m.counted.items()]
        self.metrics.accept(m.count)
