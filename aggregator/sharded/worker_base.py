"""What the parts of a shard worker share: its attributes and the steps one part calls in
another.

``ShardWorker`` (``aggregator.sharded.worker``) is built from parts, one concept each: taking
the fleet's updates into its share of a round (``worker_intake``) and answering the reducer
with partial sums (``worker_partials``). This base only declares what they use;
``ShardWorker.__init__`` sets it, a site gateway overrides the hooks.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from aggregator.intake import UpdateIntake
from aggregator.journal import RoundJournal
from aggregator.keyring import KeyRing
from aggregator.rounds import OpenRound, RoundContext
from aggregator.sharded.partials import PartialRequest, ShardPolicy, ShardTopics
from aggregator.sharded.settings import WorkerConfig
from aggregator.weighting import SampleCap
from fedge.chunks import ModelReceiver
from fedge.envelopes import RoundTask
from fedge.limits import Limits
from fedge.tensors import TensorSpec
from fedge.topics import Topics
from fedge.transport.base import Cancellable, Loop, RoleSession

__all__ = ["WorkerBase", "worker_log"]

# One logger for the worker's whole story, whichever part tells it.
worker_log = logging.getLogger("aggregator.sharded.worker")


class WorkerBase:
    config: WorkerConfig
    name: str
    mux: Loop
    limits: Limits
    keyring: KeyRing | None
    topics: Topics
    shard_topics: ShardTopics
    journal: RoundJournal
    round: OpenRound | None
    spec: TensorSpec | None
    model_version: int
    folded: int
    ready: threading.Event
    _task: RoundTask | None
    _ctx: RoundContext | None
    _excluded: set[str]
    _pending: list[tuple[str, bytes, Callable[[], None]]]
    _sealed: int
    _early: list[PartialRequest]
    _weight_reference: int
    _cap: SampleCap
    policy: ShardPolicy
    _deadline: Cancellable | None
    _models: ModelReceiver
    session: RoleSession
    intake: UpdateIntake

    if TYPE_CHECKING:  # each defined by one part (or a gateway's hook), called by another

        def _start_round(self, task: RoundTask) -> None: ...

        def _on_request(self, req: PartialRequest) -> None: ...

        def _settle(self, new_round: int) -> None: ...

        def _publish_partial(self, request: int, *, final: bool) -> None: ...
