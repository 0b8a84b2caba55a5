"""What the parts of the round lifecycle share: its attributes and the steps one part calls in
another.

``RoundLifecycle`` (``aggregator.lifecycle``) opens rounds and takes updates; closing or
failing a round is ``aggregator.closing``, publishing the new version
``aggregator.version_publishing``. This base only declares what they use;
``RoundLifecycle.__init__`` sets it, the modes override the hooks.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from aggregator.config import AggregatorConfig
from aggregator.finetune import FineTune
from aggregator.intake import UpdateIntake
from aggregator.journal import RoundJournal
from aggregator.metrics import MetricsSink
from aggregator.parts import RoundParts
from aggregator.presence import Presence
from aggregator.publisher import ModelPublisher
from aggregator.rounds import OpenRound, RoundContext
from aggregator.state import ServiceState
from aggregator.strategies.base import Strategy
from fedge.transport.base import Cancellable, RoleSession

__all__ = ["LifecycleBase", "lifecycle_log"]

# One logger for the rounds' whole story, whichever part tells it.
lifecycle_log = logging.getLogger("aggregator.lifecycle")


class LifecycleBase:
    parts: RoundParts
    config: AggregatorConfig
    session: RoleSession
    strategy: Strategy
    publisher: ModelPublisher
    journal: RoundJournal
    intake: UpdateIntake
    presence: Presence
    metrics: MetricsSink
    state: ServiceState
    calib_ranges: dict[str, tuple[float, float]] | None
    round: OpenRound | None
    ctx: RoundContext | None
    _deadline: Cancellable | None
    finetune: FineTune

    if TYPE_CHECKING:  # each defined by one part (or a mode's hook), called by another

        def _checkpoint(self, counted: tuple[str, ...]) -> None: ...

        def _open_round(self) -> None: ...

        def _publish_version(self, rnd: OpenRound) -> dict[str, Any]: ...

        def _accepting(self) -> dict[int, OpenRound] | None: ...

        def _ended(self) -> None: ...

        def _short_of_quorum(self, rnd: OpenRound) -> None: ...

        def _gather(self, rnd: OpenRound) -> None: ...

        def _counted_record(self, rnd: OpenRound) -> dict[str, str]: ...
