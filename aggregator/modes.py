"""The round policies of the service in its two single-process modes.

``SyncRounds`` (``mode: sync``): rounds with a barrier. A round answers only itself, closes at
its target, early when every online device asked has answered, and fails at its deadline
short of ``min_devices``.

``AsyncRounds`` (``mode: async``, FedBuff): no barrier. A version is produced every
``async_buffer`` (K) folded updates; an update may answer any round still in the window
(base version at most ``max_staleness`` versions old, else ``too_stale``) and is folded with
its delta scaled by the staleness weight (``StalenessWeight``, default ``(1+s)^-0.5``). A
deadline short of ``min_devices`` extends the round instead of failing it. The window's tasks
and who was counted in each are in the checkpoint.

The sharded reducer is ``aggregator.sharded.mode.ShardedRounds``.
"""

from __future__ import annotations

from aggregator.lifecycle import RoundLifecycle
from aggregator.parts import RoundParts
from aggregator.rounds import OpenRound
from aggregator.strategies.staleness import StalenessWeight
from fedge.tensors import TensorSpec

__all__ = ["AsyncRounds", "SyncRounds"]


class SyncRounds(RoundLifecycle):
    def _maybe_close_early(self) -> None:
        rnd = self.round
        if rnd is None or self.strategy.count < self.config.min_devices:
            return
        if self.presence.all_answered(rnd.task, rnd.counted):
            self._close_round()


class AsyncRounds(RoundLifecycle):
    def __init__(self, parts: RoundParts) -> None:
        super().__init__(parts)
        self.strategy.set_staleness_weight(StalenessWeight.parse(self.config.staleness_weight))

    @property
    def window(self) -> dict[int, OpenRound]:
        return self.state.window

    def _accepts_from(self) -> int | None:
        # The rounds _began keeps accepting, and the new one.
        oldest = self.state.version - self.config.max_staleness
        kept = [r for r, o in self.window.items() if o.task.base_version >= oldest]
        return min(kept, default=self.state.last_round)

    def _accepting(self) -> dict[int, OpenRound] | None:
        return self.window

    def _began(self, rnd: OpenRound, spec: TensorSpec) -> None:
        self.window[rnd.round] = rnd
        oldest = self.state.version - self.config.max_staleness
        for r in [r for r, o in self.window.items() if o.task.base_version < oldest]:
            del self.window[r]

    def _replaying(self, journaled: list[tuple[str, bytes]]) -> None:
        assert self.ctx is not None
        self.intake.uncount(journaled, self.ctx)

    def _target(self) -> int:
        return self.config.async_buffer

    def _short_of_quorum(self, rnd: OpenRound) -> None:
        self._extend_round()  # no barrier to fail: keep collecting

    def _counted_record(self, rnd: OpenRound) -> dict[str, str]:
        return {f"{d}@{r}": u for d, r, u, _ in rnd.folded}

    def _window_tasks(self) -> tuple[bytes, ...]:
        return tuple(r.task.to_bytes() for r in self.window.values())
