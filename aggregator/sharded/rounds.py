"""The aggregator service as the reducer of sharded aggregation (``shard_workers`` set).

The service then reads no updates: shard workers (``fedge shard-worker``) share them through
``$share/<group>/{p}/update/+``, validate, journal, confirm and fold them. While a round is
open, :class:`ShardedRound` asks every worker for its partial sum (``PartialRequest`` on
``{p}/round/close``) every ``poll`` seconds, but not while an answer is outstanding (unless it
has been for ``retry`` seconds: a request can be lost): a worker slower than the polling is
not asked faster than it answers, and its answer still counts. Each complete set is merged
(``aggregator.sharded.reducer``) and handed to ``on_merged``, where the service decides whether the
round should close (target reached, every online device answered, or the deadline passed).
To close it calls :meth:`seal`: a final request after which workers refuse the round's late
updates, so the final merge holds every update a worker confirmed with a receipt; the service
closes on that merge. A worker that does not answer holds the round open: closing without it
would lose updates it has journaled and confirmed. It is named in the log every
``warn_after`` seconds until it answers, with the reason when its partials are refused.

Site gateways (``leave_after`` > 0) are the exception: a site cut off from the centre keeps
its updates durable and tells its devices when they came too late, so once the deadline is
``leave_after`` seconds past, a gateway that has not answered a request sent at least that
long ago is left out of the round (``Reducer.leave_out``), and the others close it.

Runs on the service's mux thread, over the service's session.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from aggregator.sharded.partials import ShardPolicy, ShardTopics
from aggregator.sharded.reducer import Merged, Reducer
from fedge.envelopes import RoundTask
from fedge.limits import Limits
from fedge.tensors import TensorSpec
from fedge.topics import Topics
from fedge.transport.base import Cancellable, Loop, RoleSession

__all__ = ["ShardedRound"]

log = logging.getLogger(__name__)


class ShardedRound:
    def __init__(
        self,
        topics: Topics,
        workers: Sequence[str],
        session: RoleSession,
        mux: Loop,
        *,
        poll: float,
        limits: Limits,
        on_merged: Callable[[Merged], Any],
        policy: ShardPolicy | None = None,
        warn_after: float = 30.0,
        retry: float = 10.0,
        leave_after: float = 0.0,
    ) -> None:
        self.topics = ShardTopics(topics)
        self.mux = mux
        self.poll = poll
        self.warn_after = warn_after
        self.retry = max(retry, poll)
        self._session = session
        self._on_merged = on_merged
        self.reducer = Reducer(self.topics, workers, self._publish, limits=limits, policy=policy)
        self.merges = 0
        self.leave_after = leave_after
        self._timer: Cancellable | None = None
        self._round = 0
        self._deadline = math.inf
        self._answered_at = 0.0
        self._asked_at = -math.inf

    def _publish(self, topic: str, payload: bytes) -> Any:
        return self._session.publish(topic, payload, qos=1)

    @property
    def sealing(self) -> bool:
        return self.reducer.sealing

    def begin(self, task: RoundTask, spec: TensorSpec) -> None:
        """A new round: forget the last one's partials; start polling."""
        self.stop()
        self._round = task.round
        self._deadline = task.deadline
        self._answered_at = time.monotonic()
        self._asked_at = -math.inf
        self.reducer.begin(task.round, task.base_version, spec, self._merged)
        self._timer = self.mux.call_later(self.poll, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def request_now(self) -> None:
        """Ask every worker for its partial, unless answers are still on their way."""
        if not self._session.connected:
            return
        stale = time.monotonic() - self._asked_at > self.retry
        if self.reducer.outstanding() and not stale:
            return
        self.reducer.request(final=self.sealing)
        self._asked_at = time.monotonic()

    def seal(self) -> None:
        """Ask for the final partials; the round closes on their merge (``Merged.final``)."""
        if self.sealing or not self._session.connected:
            return
        self.reducer.request(final=True)
        self._asked_at = time.monotonic()

    def handle(self, topic: str, payload: bytes) -> bool:
        """Feed a message; False if it is not a partial sum."""
        return self.reducer.handle(topic, payload)

    def _leave_out_silent(self) -> None:
        """Sites: past the deadline by ``leave_after``, go on without the silent gateways."""
        if self.leave_after <= 0 or time.time() < self._deadline + self.leave_after:
            return
        if time.monotonic() - self._asked_at < self.leave_after:
            return  # the newest request is younger than that: answers may be on their way
        silent = self.reducer.outstanding()
        if silent:
            self.reducer.leave_out(silent)

    def _tick(self) -> None:
        self._timer = None
        silent = time.monotonic() - self._answered_at
        if silent > self.warn_after:
            refused = "; ".join(f"{w}: {why}" for w, why in self.reducer.refused.items())
            log.warning(
                "round %d: no complete set of partials for %.0f s; waiting for %s%s",
                self._round,
                silent,
                ", ".join(self.reducer.outstanding()) or "a merge",
                f" (refused: {refused})" if refused else "",
            )
            self._answered_at = time.monotonic()  # warn again after another warn_after
        self._leave_out_silent()
        self.request_now()
        self._timer = self.mux.call_later(self.poll, self._tick)

    def _merged(self, m: Merged) -> None:
        if m.round != self._round:
            return
        self.merges += 1
        self._answered_at = time.monotonic()
        self._on_merged(m)
