"""The edge agent's models: keeping a full model or the one patches bring, persisted before use.

A part of ``EdgeAgent`` (``edge_agent.agent_base``); ``self.models`` and ``self.downlink``
verify, this part parses, persists and adopts.
"""

from __future__ import annotations

import time

import numpy as np

from edge_agent.agent_base import AgentBase
from edge_agent.agent_base import agent_log as log
from edge_agent.downlink import Patched
from edge_agent.store import HeldModel
from fedge.envelopes import DeviceState, GlobalModel

__all__ = ["ModelAdoption"]


class ModelAdoption(AgentBase):
    def _on_model(self, m: GlobalModel) -> None:
        """Keep a complete, verified model (``self.models`` checked version and signature)."""
        from models.onnx_weights import read_initializers

        try:
            # Parse before keeping it: a model we cannot train from must not replace ours.
            entry = self._cache.get(m.sha256, m.onnx, read_initializers)
        except ValueError as e:
            log.warning("%s: refused model v%d: %s", self.device_id, m.version, e)
            self.counters.models_rejected += 1
            return
        problem = self.data.width_problem(m.arch.input_dim)
        if problem:
            # Once per model, not a torch traceback per round: each round is then skipped.
            log.error(
                "%s: model v%d: %s; fix data: in the config", self.device_id, m.version, problem
            )
        self.store.save_model(m)
        self.models.hold(m.version, m.sha256)
        self._entry = entry
        self.model = HeldModel(m.version, m.arch, m.sha256, entry.onnx)
        self._weights = entry.weights
        log.info(
            "%s: model v%d received (%d bytes, sha256 ok, %s)",
            self.device_id,
            m.version,
            len(m.onnx),
            "signature verified" if self.models.verify_key is not None else "unsigned",
        )
        self.downlink.adopted_full(m.metrics.get("patch_retain", 0.0) > 0)
        patched = self.downlink.advance((m.version, entry.weights))
        if patched is not None:
            self._adopt_patched(patched)
            return
        # The retained status names the model held: `fedge status` and the dashboard read it.
        self._publish_status(DeviceState.ONLINE)
        self._advance()

    def _on_patch(self, payload: bytes) -> None:
        held = (self.model.version, self._global_weights(self.model)) if self.model else None
        patched = self.downlink.offer(payload, held)
        if patched is not None:
            self._adopt_patched(patched)

    def _adopt_patched(self, p: Patched) -> None:
        """Keep the model patches brought: its initializers written into the graph we hold
        (so ``fedge agent predict`` runs it), persisted before it is used."""
        from models.onnx_weights import onnx_sha256, replace_initializers

        m = self.model
        assert m is not None
        entry = self._cache.patched(
            p.sha256, lambda: (replace_initializers(m.onnx, p.weights), p.weights)
        )
        sha = onnx_sha256(entry.onnx)
        self.store.save_model(GlobalModel(p.version, m.arch, entry.onnx, sha, time.time()))
        self.models.hold(p.version, sha)
        self._entry = entry
        self.model = HeldModel(p.version, m.arch, sha, entry.onnx)
        self._weights = entry.weights
        log.info("%s: model v%d from patches (weights sha256 ok)", self.device_id, p.version)
        self._publish_status(DeviceState.ONLINE)
        self._advance()

    def _global_weights(self, m: HeldModel) -> dict[str, np.ndarray]:
        if self._weights is None:
            from models.onnx_weights import read_initializers

            self._weights = read_initializers(m.onnx)
        return self._weights
