"""The aggregator service as the reducer of sharded aggregation (``shard_workers`` set).

The service then reads no updates: shard workers (``fedge shard-worker``) share them through
``$share/<group>/{p}/update/+``, validate, journal, confirm and fold them. While a round is
open, :class:`ShardedRound` asks every worker for its partial sum every ``poll`` seconds
(``PartialRequest`` on ``{p}/round/close``); each complete set is checked for devices counted
twice, merged (``aggregator.reducer``) and handed to ``on_merged``, where the service decides
to close the round (target reached, every online device answered, or the deadline passed)
or to wait for the next merge. A worker that does not answer holds the round open: closing
without it would lose updates it has journaled and confirmed. It is named in the log every
``warn_after`` seconds until it answers.

Runs on the service's mux thread, over the service's session.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from aggregator.reducer import Merged, Reducer
from fedge.envelopes import RoundTask
from fedge.limits import Limits
from fedge.mux import Mux, Timer
from fedge.partials import ShardTopics
from fedge.session import Session
from fedge.tensors import TensorSpec
from fedge.topics import Topics

__all__ = ["ShardedRound"]

log = logging.getLogger(__name__)


class ShardedRound:
    def __init__(
        self,
        topics: Topics,
        workers: Sequence[str],
        session: Session,
        mux: Mux,
        *,
        poll: float,
        limits: Limits,
        on_merged: Callable[[Merged], Any],
        warn_after: float = 30.0,
    ) -> None:
        self.topics = ShardTopics(topics)
        self.mux = mux
        self.poll = poll
        self.warn_after = warn_after
        self._session = session
        self._on_merged = on_merged
        self.reducer = Reducer(self.topics, workers, self._publish, limits=limits)
        self.merges = 0
        self._timer: Timer | None = None
        self._round = 0
        self._answered_at = 0.0

    @property
    def subscriptions(self) -> list[str]:
        return [self.topics.all_partials]

    def _publish(self, topic: str, payload: bytes) -> Any:
        return self._session.publish(topic, payload, qos=1)

    def begin(self, task: RoundTask, spec: TensorSpec) -> None:
        """A new round: forget the last one's partials; start polling."""
        self.stop()
        self._round = task.round
        self._answered_at = time.monotonic()
        self.reducer.begin(task.round, task.base_version, spec, self._merged)
        self._timer = self.mux.call_later(self.poll, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def request_now(self) -> None:
        """Ask every worker for its partial at once (the deadline passed)."""
        if self._session.connected:
            self.reducer.request()

    def handle(self, topic: str, payload: bytes) -> bool:
        """Feed a message; False if it is not a partial sum."""
        return self.reducer.handle(topic, payload)

    def _tick(self) -> None:
        self._timer = None
        silent = time.monotonic() - self._answered_at
        if silent > self.warn_after:
            missing = self.reducer.missing()
            log.warning(
                "round %d: no complete set of partials for %.0f s; waiting for %s",
                self._round,
                silent,
                ", ".join(missing) or "a merge",
            )
            self._answered_at = time.monotonic()  # warn again after another warn_after
        self.request_now()
        self._timer = self.mux.call_later(self.poll, self._tick)

    def _merged(self, m: Merged) -> None:
        if m.round != self._round:
            return
        self.merges += 1
        self._answered_at = time.monotonic()
        self._on_merged(m)
