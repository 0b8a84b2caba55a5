"""A shard worker's answers to the reducer: its partial sum of the open round (dense, or a
summary), devices the reducer drops, the seal; and the hooks a site gateway fills in.

A part of ``ShardWorker`` (``aggregator.sharded.worker_base``).
"""

from __future__ import annotations

from aggregator.sharded.clipped_sum import ClippedSum
from aggregator.sharded.partials import PartialRequest, PartialSum
from aggregator.sharded.worker_base import WorkerBase
from aggregator.sharded.worker_base import worker_log as log
from fedge.errors import AggregationError, ProtocolError

__all__ = ["WorkerPartials"]


class WorkerPartials(WorkerBase):
    # -- partial sums ------------------------------------------------------------------------
    def _on_request(self, req: PartialRequest) -> None:
        rnd = self.round
        if rnd is None or req.round > rnd.round:
            if len(self._early) < 64:  # a few per round; a flood of forged ones is capped
                self._early.append(req)
            return
        if not req.asks(self.name):
            self._not_asked(req)
            return
        if req.round != rnd.round:
            mine = rnd.round
            log.info("%s: request for round %d, mine is %s", self.name, req.round, mine)
            return
        drop = set(req.drop) & {d for d in rnd.counted if d not in self._excluded}
        if drop:
            self._excluded |= drop
            uplink, rejected = rnd.uplink_bytes, dict(rnd.rejected)
            self._start_round(rnd.task)  # fold the journal again without them
            self.round.uplink_bytes, self.round.rejected = uplink, rejected  # type: ignore[union-attr]
            log.info("%s: dropped %s from round %d", self.name, sorted(drop), rnd.round)
        if req.final:
            self._sealed = rnd.round
            self._on_sealed(rnd.round)
        self._publish_partial(req.request, final=req.final)

    # -- hooks of a site gateway (aggregator/gateway/site.py) -------------------------------
    def _settle(self, new_round: int) -> None:
        """Before the journals of rounds below ``new_round`` go (a newer task came)."""

    def _not_asked(self, req: PartialRequest) -> None:
        """A request for other workers (a final one naming others: left out)."""

    def _on_sealed(self, round_id: int) -> None:
        """The reducer sealed ``round_id`` asking this worker: its partial closes it."""

    def _dense(self, final: bool) -> bool:
        """Send the sums (True) or a summary (counts and ids) in answer to a request."""
        return True

    def partial(self, request: int, *, dense: bool = True) -> PartialSum:
        """This worker's share of the open round (mux thread); ``dense=False``: a summary."""
        rnd, ctx = self.round, self._ctx
        if rnd is None or ctx is None:
            raise AggregationError(f"{self.name}: no open round")
        assert isinstance(ctx.sink, ClippedSum)
        acc = ctx.sink.acc
        return PartialSum(
            round=rnd.round,
            base_version=rnd.task.base_version,
            worker=self.name,
            request=request,
            total_weight=acc.total_weight,
            counted={d: u for d, u in rnd.counted.items() if d not in self._excluded},
            sums=acc.sums if dense else {},
            uplink_bytes=rnd.uplink_bytes,
            loss_sum=rnd.train_loss_sum,
            policy=self.policy,
            rejected=dict(rnd.rejected),
        )

    def _publish_partial(self, request: int, *, final: bool) -> None:
        if self.round is None:
            return
        p = self.partial(request, dense=self._dense(final))
        try:
            self.session.publish(self.shard_topics.partial(self.name), p.to_bytes())
        except ProtocolError as e:  # larger than one packet: partials are not chunked yet
            log.error("%s: cannot publish partial of round %d: %s", self.name, p.round, e)
