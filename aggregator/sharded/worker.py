"""A shard worker: one of N aggregator processes that share the fleet's updates.

Workers subscribe to ``$share/<group>/{p}/update/+`` (MQTT 5 shared subscription), so the
broker hands each update to one of them. A worker takes it through the aggregator's own
intake (``aggregator.intake``: the same checks against an ``OpenRound`` of the retained task
and the spec of the retained model, the fsynced journal before the ack, the receipt), folding
it into a float64 ``WeightedSum`` bounded by ``clip_norm`` (``ClippedSum``); only its own
cases stay here: an update whose round is ahead is held, one after the seal refused. Asked by
the reducer (``PartialRequest`` on ``{p}/round/close``), or at the task's deadline, it
publishes its ``PartialSum`` on ``{p}/partial/<worker>``. A round's journal is kept until the
next task (the reducer publishes it after its checkpoint): a restarted worker replays its
share, and a device the reducer tells it to drop goes by folding the journal again without it.

Each worker needs its own broker identity (``use_username_as_clientid``: workers sharing one
username kick each other) with read access to ``{p}/update/+``: ``broker_config/acl.sharded``.
Everything runs on the mux thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from aggregator.intake import UpdateIntake
from aggregator.journal import RoundJournal
from aggregator.keyring import KeyRing
from aggregator.metrics import MetricsSink, NullMetrics
from aggregator.rounds import OpenRound, RoundContext
from aggregator.sharded.partials import PartialRequest, PartialSum, ShardPolicy, ShardTopics
from aggregator.sharded.settings import WorkerConfig, worker_sessions
from aggregator.strategies.accumulator import WeightedSum, squared_norm
from aggregator.weighting import SampleCap, lower_median
from fedge.chunks import ModelReceiver
from fedge.envelopes import (
    DeviceState,
    DeviceStatus,
    GlobalModel,
    RoundTask,
)
from fedge.errors import AggregationError, ProtocolError
from fedge.limits import DEFAULT_LIMITS, Limits
from fedge.task_check import check_task
from fedge.tensors import TensorSpec, spec_of
from fedge.topics import Topics
from fedge.transport.base import Cancellable, Loop, SessionFactory, SessionRequest
from fedge.transport.mqtt import publish_packet_size

__all__ = ["ClippedSum", "ShardWorker", "WorkerConfig"]

log = logging.getLogger(__name__)


class ClippedSum:
    """A worker's share of a round: a float64 ``WeightedSum`` of updates whose norm is bounded
    by ``clip_norm`` as the strategies' ``fold`` bounds it (0: unbounded). A ``FoldSink``."""

    def __init__(self, spec: TensorSpec, clip_norm: float) -> None:
        self.acc = WeightedSum(spec)
        self.clip_norm = clip_norm

    def fold(
        self, delta: Mapping[str, np.ndarray], num_samples: int, *, staleness: int = 0
    ) -> None:
        scale = 1.0
        if self.clip_norm > 0:
            norm = squared_norm(delta) ** 0.5
            scale = min(1.0, self.clip_norm / norm) if norm > 0 else 1.0
        self.acc.add(delta, num_samples, scale=scale)


class ShardWorker:
    def __init__(
        self,
        config: WorkerConfig,
        mux: Loop,
        *,
        limits: Limits = DEFAULT_LIMITS,
        keyring: KeyRing | None = None,
        session_factory: SessionFactory | None = None,
        metrics: MetricsSink | None = None,
    ) -> None:
        self.config = config
        self.name = config.worker
        self.mux = mux
        self.limits = limits
        self.keyring = keyring
        self.topics = Topics(config.fleet)
        self.shard_topics = ShardTopics(self.topics)
        self.journal = RoundJournal(Path(config.state_dir) / "journal")
        self.round: OpenRound | None = None
        self.spec: TensorSpec | None = None
        self.model_version = -1
        self.folded = 0  # updates folded over the worker's life (replays included)
        self.ready = threading.Event()  # holds the model and the task of an open round
        self._task: RoundTask | None = None
        self._ctx: RoundContext | None = None
        self._excluded: set[str] = set()
        # Updates that came before their round's task, each with the ack of its message:
        # unacked, the broker keeps them (and redelivers them if this process dies).
        self._pending: list[tuple[str, bytes, Callable[[], None]]] = []
        self._sealed = 0  # the round the reducer sealed: its later updates are refused
        # Requests for a round this worker has not opened yet (they came before the task or
        # the model, e.g. queued while the worker was down): taken up, in order, once the
        # round opens.
        self._early: list[PartialRequest] = []
        # The lower median of the weights this worker folded in its last round: the cap of
        # its next one (aggregator/weighting.py; the service's rule on this worker's share).
        self._weight_reference = 0
        self._cap = SampleCap(config.max_num_samples, config.max_sample_ratio)
        self.policy = ShardPolicy(
            signed=keyring is not None,
            clip_norm=config.clip_norm,
            max_num_samples=config.max_num_samples,
        )
        self._deadline: Cancellable | None = None
        # No verify key and no version floor: the worker's own version check drops repeats.
        self._models = ModelReceiver(self.topics, limits)
        self.session = (session_factory or worker_sessions(config, mux))(self._session_request())
        self.intake = UpdateIntake(
            session=self.session,
            topics=self.topics,
            journal=self.journal,
            metrics=metrics or NullMetrics(),
            limits=limits,
            max_num_samples=config.max_num_samples,
            keyring=keyring,
            name=self.name,
        )

    @property
    def task_codec(self) -> str:
        """The codec of the task held ("unknown" before the first): a metrics label."""
        return self._task.codec if self._task is not None else "unknown"

    def _session_request(self) -> SessionRequest:
        offline = DeviceStatus(self.name, DeviceState.OFFLINE, ts=0.0).to_bytes()
        return SessionRequest(
            self.name,
            # One SUBSCRIBE: the retained model and task arrive after its SUBACK, so a
            # worker that holds both has its share of updates flowing too.
            subscriptions=[
                self.topics.model,
                self.topics.all_model_chunks,
                self.topics.task,
                self.shard_topics.request,
                self.shard_topics.shared_updates(self.config.group),
            ],
            on_message=self._on_message,
            on_connected=self._on_connected,
            # An update is acked only once it is in the journal (handler returned).
            manual_ack=True,
            will=(self.topics.status(self.name), offline),
            session_expiry=self.config.session_expiry,
        )

    def start(self) -> None:
        self.session.start()

    def stop(self) -> None:
        self.mux.call_soon(self._stop)

    def _stop(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self.journal.close()
        offline = DeviceStatus(self.name, DeviceState.OFFLINE, ts=time.time()).to_bytes()
        self.session.close(last=(self.topics.status(self.name), offline))

    def _on_connected(self) -> None:
        # Announce the worker on its status topic (retained; the will says offline). The
        # broker handles this connection's SUBSCRIBE before this PUBLISH, so once the
        # reducer sees it the shared subscription exists and the broker keeps this worker's
        # share of updates, connected or not (persistent session).
        status = DeviceStatus(self.name, DeviceState.ONLINE, ts=time.time()).to_bytes()
        self.session.publish(self.topics.status(self.name), status, qos=1, retain=True)

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
