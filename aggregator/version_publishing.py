"""Publishing a new version: render (ONNX, the int8 twin, the pruned serving model), patches
before the full model, the schedules stepped, and the version's metrics record.

A part of ``RoundLifecycle`` (``aggregator.lifecycle_base``), called by ``RoundClosing``
once the version is checkpointed.
"""

from __future__ import annotations

import time
from typing import Any

from aggregator.lifecycle_base import LifecycleBase
from aggregator.rounds import OpenRound

__all__ = ["VersionPublishing"]


class VersionPublishing(LifecycleBase):
    def _publish_version(self, rnd: OpenRound) -> dict[str, Any]:
        """Render, evaluate, publish the new version; step the schedules; its record."""
        pub = self.publisher
        provenance = {"round": rnd.round, "devices": sorted(rnd.counted)}
        chain = self.state.downlink
        metrics: dict[str, Any] = dict(
            pub.render(self.state.version, chain.served(self.state.weights), provenance)
        )
        if rnd.calib is not None:
            ranges = rnd.calib.merged() if rnd.calib.reports else None
            metrics.update(pub.render_int8(self.state.version, ranges))
            self.calib_ranges = ranges or self.calib_ranges
        if self.parts.pruner is not None:
            metrics.update(self.parts.pruner.serve(pub, self.state.version, self.calib_ranges))
        chain.publish(self.session, self.parts.topics)  # before the full model: devices patch
        pub.publish(self.session)
        if chain.active:
            metrics.update(
                patch_bytes=chain.patch_bytes,
                downlink_residual=chain.residual_norm(self.state.weights),
            )
        if self.config.keep_versions:
            self.parts.registry.prune(self.config.keep_versions)
        metrics.update(self.strategy.round_metrics())
        self.parts.adaptive.step(metrics, rnd.task.hyper.lr)
        if self.parts.adaptive:
            # The schedules stepped on this version's accuracy, known only after the export:
            # checkpoint again so a crash now does not forget the step.
            self._checkpoint(counted=tuple(rnd.counted))
        return {
            "round": rnd.round,
            "version": self.state.version,
            # device -> update id: the audit trail the fault suite checks for loss/duplicates.
            "counted": self._counted_record(rnd),
            **rnd.record(),
            "model_bytes": pub.model_bytes,
            "seconds": time.time() - rnd.opened_at,
            "ts": time.time(),
            **metrics,
        }
