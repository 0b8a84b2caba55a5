"""Closing a round: at its target or deadline, apply the strategy, checkpoint, then publish;
or fail it with a logged reason and open the next.

A part of ``RoundLifecycle`` (``aggregator.lifecycle_base``): the crash-safety order (the
version and its patch checkpointed before they are sent, the journal discarded after) is here.
"""

from __future__ import annotations

import time

import numpy as np

from aggregator.lifecycle_base import LifecycleBase
from aggregator.lifecycle_base import lifecycle_log as log
from aggregator.rounds import OpenRound
from aggregator.weighting import SampleCap, lower_median, refold_capped
from fedge.errors import AggregationError
from fedge.support.faults import crash_point

__all__ = ["RoundClosing"]


class RoundClosing(LifecycleBase):
    # -- closing ----------------------------------------------------------------------------------
    def _on_deadline(self) -> None:
        rnd = self.round
        if rnd is None:
            return
        if not self.session.connected:
            return  # on_connected extends the round once the broker is back
        if self.strategy.count >= self.config.min_devices:
            self._close_round()
            return
        self._short_of_quorum(rnd)

    def _fail_round(self, rnd: OpenRound, reason: str) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._ended()
        self.state.failed_rounds += 1
        log.warning("round %d failed: %s", rnd.round, reason)
        self.metrics.write(
            {
                "round": rnd.round,
                "failed": reason,
                "uplink_bytes": rnd.uplink_bytes,
                "rejected": dict(rnd.rejected),
                "ts": time.time(),
            }
        )
        self.round = None
        self._open_round()
        self.journal.discard_through(rnd.round)

    def _close_round(self) -> None:
        rnd = self.round
        assert rnd is not None
        if self._deadline is not None:
            self._deadline.cancel()
        try:
            self._gather(rnd)
            self._refold_first_round(rnd)
            new = self.strategy.finish(self.state.weights)
            new = self.finetune.hold(self.state.weights, new, self.strategy, rnd.task.trainable)
        except AggregationError as e:
            self._fail_round(rnd, f"aggregation failed: {e}")
            return
        if not all(np.isfinite(v).all() for v in new.values()):
            # Finite inputs can still overflow float32; never publish or checkpoint that.
            self._fail_round(rnd, "aggregate is not finite (overflow); model kept")
            return
        self.state.version += 1
        if self.parts.pruner is not None:
            # Masks the new weights in place: the patch below carries the pruned target.
            self.parts.pruner.step(self.state.version, new)
        # The patch to the new version is made before the checkpoint that holds it.
        self.state.weights = self.state.downlink.advance(
            self.state.version, new, self.publisher.signing_key
        )
        if rnd.weights:  # a sharded reducer folds partial sums, not weights
            self.state.weight_reference = lower_median(rnd.weights)
        self.round = None
        self._ended()
        self._checkpoint(counted=tuple(rnd.counted))
        crash_point("after_version_checkpoint")  # the version and its patch are durable, unsent
        self.journal.discard_through(rnd.round)
        self._clear_task()
        record = self._publish_version(rnd)
        self.metrics.write(record)
        if self.parts.on_round is not None:
            self.parts.on_round(record)
        if self.config.rounds and self.state.version >= self.config.rounds:
            self.parts.done.set()
        else:
            self._open_round()

    def _clear_task(self) -> None:
        """Delete the closed round's retained task (an empty retained publish, ~30 bytes to
        each device).

        Rendering and publishing the next version takes a while; a device that (re)connected
        meanwhile got the closed round's task with the model it was made for, trained for
        nothing and was refused as ``wrong_round`` (seen in 1 of 5 runs of
        tests/integration/test_agent_restart.py). A held task is dropped on the empty
        payload (protocol §9.5). Sync rounds only: in async mode devices may still answer an
        older round within the window."""
        if self._accepting() is None:
            self.session.publish(self.parts.topics.task, b"", qos=1, retain=True)

    def _refold_first_round(self, rnd: OpenRound) -> None:
        """A round without a weight reference (a new fleet's first) took each update as it came,
        with only the absolute clamp: once all its counts are known, if one is above the cap
        its own lower median gives, fold the round again from its journal with that cap
        (aggregator/weighting.py). One update in memory at a time; sync mode only."""
        ctx = self.ctx
        if ctx is None or ctx.window is not None or self.state.weight_reference or not rnd.weights:
            return
        cap = SampleCap(self.config.max_num_samples, self.config.max_sample_ratio)
        limit = cap.cap(lower_median(rnd.weights))
        if max(rnd.weights) <= limit:
            return
        rnd.weights = refold_capped(
            self.strategy,
            self.journal.records(rnd.round),
            rnd.counted,
            ctx.spec,
            self.parts.limits,
            limit,
        )
        log.info(
            "round %d: a count above %d (%.1f x the round's lower median): folded again with "
            "that cap",
            rnd.round,
            limit,
            self.config.max_sample_ratio,
        )
