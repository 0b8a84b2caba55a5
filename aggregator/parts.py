"""The parts a service wires together for its rounds (``aggregator/service.py`` builds them,
``aggregator/lifecycle.py`` and the modes use them)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aggregator.adaptive import AdaptiveLR
from aggregator.checkpoint import StateFile
from aggregator.config import AggregatorConfig
from aggregator.intake import UpdateIntake
from aggregator.journal import RoundJournal
from aggregator.keyring import KeyRing
from aggregator.metrics import MetricsSink
from aggregator.presence import Presence
from aggregator.pruning import Pruner
from aggregator.publisher import ModelPublisher
from aggregator.registry import ModelRegistry
from aggregator.strategies.base import Strategy
from fedge.limits import Limits
from fedge.topics import Topics
from fedge.transport.base import Loop, RoleSession

__all__ = ["RoundCallback", "RoundParts"]


RoundCallback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class RoundParts:
    """What the service wires together for its rounds (aggregator/service.py)."""

    config: AggregatorConfig
    loop: Loop
    session: RoleSession
    topics: Topics
    limits: Limits
    strategy: Strategy
    adaptive: AdaptiveLR
    publisher: ModelPublisher
    registry: ModelRegistry
    journal: RoundJournal
    state_file: StateFile
    intake: UpdateIntake
    presence: Presence
    metrics: MetricsSink
    keyring: KeyRing | None
    done: threading.Event
    on_round: RoundCallback | None
    pruner: Pruner | None = None  # aggregator/pruning.py, with ``pruning:`` configured
