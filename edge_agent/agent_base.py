"""What the parts of the edge agent share: its attributes and the steps one part calls in another.

``EdgeAgent`` (``edge_agent.agent``) is built from parts, one concept each: the routing of
incoming messages (``edge_agent.routing``), the adoption of models (``edge_agent.adoption``)
and a round's training and upload (``edge_agent.round_work``). This base only declares what
they use; ``EdgeAgent.__init__`` sets it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_agent.data import LocalData
from edge_agent.downlink import Downlink
from edge_agent.model_cache import ModelCache
from edge_agent.outbox import Outbox
from edge_agent.residual import Residual
from edge_agent.secagg import SecAggDevice
from edge_agent.serving import ReleaseFollower
from edge_agent.states import AgentCounters, AgentState
from edge_agent.store import AgentStore, HeldModel
from edge_agent.uplink import Uplink
from fedge.chunks import ModelReceiver
from fedge.envelopes import DeviceState, GlobalModel, RoundTask
from fedge.identity import VerifyKey
from fedge.limits import Limits
from fedge.topics import Topics
from fedge.transport.base import RoleSession
from fedge.transport.mux import Mux

__all__ = ["AgentBase", "TrainFn", "agent_log"]

# One logger for the device's whole story, whichever part tells it.
agent_log = logging.getLogger("edge_agent.agent")

TrainFn = Callable[..., Any]


class AgentBase:
    device_id: str
    mux: Mux
    topics: Topics
    data: LocalData
    store: AgentStore
    executor: Executor
    _train_fn: TrainFn | None
    seed: int
    limits: Limits
    state: AgentState
    counters: AgentCounters
    model: HeldModel | None
    _weights: dict[str, np.ndarray] | None
    task: RoundTask | None
    last_round: int
    _aggregator_key: VerifyKey | None
    models: ModelReceiver
    downlink: Downlink
    residual: Residual
    outbox: Outbox
    uplink: Uplink
    _cache: ModelCache
    _entry: Any
    release: ReleaseFollower
    secagg: SecAggDevice
    session: RoleSession

    if TYPE_CHECKING:  # each defined by one part (or EdgeAgent), called by another

        def _publish_status(self, state: DeviceState) -> None: ...

        def _advance(self) -> None: ...

        def _on_model(self, m: GlobalModel) -> None: ...

        def _on_patch(self, payload: bytes) -> None: ...

        def _on_task(self, t: RoundTask) -> None: ...

        def _global_weights(self, m: HeldModel) -> dict[str, np.ndarray]: ...
