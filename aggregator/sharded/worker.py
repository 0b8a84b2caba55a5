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
Everything runs on the mux thread. The worker's parts: its intake (``worker_intake``), its
answers to the reducer (``worker_partials``), its sum (``clipped_sum``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from aggregator.intake import UpdateIntake
from aggregator.journal import RoundJournal
from aggregator.keyring import KeyRing
from aggregator.metrics import MetricsSink, NullMetrics
from aggregator.rounds import OpenRound, RoundContext
from aggregator.sharded.clipped_sum import ClippedSum
from aggregator.sharded.partials import PartialRequest, ShardPolicy, ShardTopics
from aggregator.sharded.settings import WorkerConfig, worker_sessions
from aggregator.sharded.worker_intake import WorkerIntake
from aggregator.sharded.worker_partials import WorkerPartials
from aggregator.weighting import SampleCap
from fedge.chunks import ModelReceiver
from fedge.envelopes import (
    DeviceState,
    DeviceStatus,
    RoundTask,
)
from fedge.limits import DEFAULT_LIMITS, Limits
from fedge.tensors import TensorSpec
from fedge.topics import Topics
from fedge.transport.base import Cancellable, Loop, SessionFactory, SessionRequest

__all__ = ["ClippedSum", "ShardWorker", "WorkerConfig"]

log = logging.getLogger(__name__)


class ShardWorker(WorkerIntake, WorkerPartials):
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
