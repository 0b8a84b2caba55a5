"""The downlink chain: the weights devices hold (the "device view") and the patches that
move it, one per version (fedge/patches.py has the arithmetic, protocol §5.9 and §9.8 the rules).

Per version the service makes the patch ``target - view`` with the downlink codec, keeps the
view devices compute from it byte for byte, and keeps the last ``retain`` patch messages to
(re)publish them retained on ``{p}/model/patch/{v mod retain}``: patch ``v`` replaces the one
that falls out of the window, so nothing has to be cleared (an empty retained publish would
reach every subscribed device). What a patch did not send stays in ``target - view`` and goes
out with the next one: server-side error feedback with no residual of its own to store. View
and patches are in the checkpoint, so a restarted service continues the same chain.

The full model (``{p}/model/global``) is rendered from the view, so a joiner and a device that
followed every patch hold the same weights. With ``feedback`` off the server continues from
the view instead of the exact aggregate (the remainder is dropped).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from fedge.envelopes import ModelPatch
from fedge.identity import SigningKey
from fedge.patches import make_patch
from fedge.topics import Topics
from fedge.transport.base import RoleSession

__all__ = ["DownlinkChain"]

log = logging.getLogger(__name__)

Weights = Mapping[str, np.ndarray]


class DownlinkChain:
    """The device view and the retained patches of one service (``codec`` None: full models
    only, the view is the exact weights)."""

    def __init__(
        self, codec: str | None, retain: int, *, feedback: bool = True, seed: int = 0
    ) -> None:
        self.codec = codec
        self.seed = seed  # stochastic rounding draws from (seed, version): reproducible
        self.retain = retain
        self.feedback = feedback
        self.view: dict[str, np.ndarray] = {}
        # (to_version, signed ModelPatch bytes), oldest first, at most ``retain``.
        self.patches: list[tuple[int, bytes]] = []
        # Slots at or above ``retain`` that may hold a patch from a larger window (a restart
        # with a smaller ``patch_retain``): cleared by the next publish(every=True).
        self._stale_slots: range = range(0)
        self.patch_bytes = 0  # packet size of the last patch published

    @property
    def active(self) -> bool:
        return self.codec is not None

    def reset(self, weights: Weights) -> None:
        """A new model: devices will hold exactly ``weights`` (no copy without patches)."""
        self.view = (
            {k: np.array(v, dtype=np.float32) for k, v in weights.items()} if self.active else {}
        )
        self.patches = []

    def restore(
        self, view: Weights | None, patches: list[tuple[int, bytes]], weights: Weights
    ) -> None:
        """From a checkpoint (a checkpoint without a view: the exact weights)."""
        if view is None or not self.active:
            self.reset(weights)
        else:
            self.view = {k: np.array(v, dtype=np.float32) for k, v in view.items()}
            self._stale_slots = range(self.retain, len(patches))
            self.patches = list(patches)[-self.retain :]

    def served(self, weights: Weights) -> Weights:
        """The weights devices run and the full model carries."""
        return self.view if self.active and self.view else weights

    def advance(
        self,
        new_version: int,
        target: Weights,
        signing_key: SigningKey | None,
    ) -> dict[str, np.ndarray]:
        """Make the patch to ``new_version``; returns the weights the server continues from."""
        if not self.active:
            return dict(target)
        assert self.codec is not None
        kept = [v for v, _ in self.patches][-(self.retain - 1) :] if self.retain > 1 else []
        retained_from = (kept[0] if kept else new_version) - 1
        patch, self.view = make_patch(
            self.view,
            target,
            from_version=new_version - 1,
            codec=self.codec,
            retained_from=retained_from,
            signing_key=signing_key,
            rng=np.random.default_rng([self.seed, new_version]),
        )
        self.patches = [*self.patches, (new_version, patch.to_bytes())][-self.retain :]
        if self.feedback:
            return dict(target)
        return {k: v.copy() for k, v in self.view.items()}

    def residual_norm(self, weights: Weights) -> float:
        """L2 norm of what the devices' weights still lack (``target - view``)."""
        if not self.active or not self.view:
            return 0.0
        return float(
            np.sqrt(sum(float(np.sum((weights[k] - self.view[k]) ** 2)) for k in self.view))
        )

    def publish(self, session: RoleSession, topics: Topics, *, every: bool = False) -> None:
        """The newest patch, retained in its slot ``v mod retain`` (``every``: all retained ones,
        to repair a broker that lost them, and the clearing of slots a larger window used)."""
        if not self.active or not self.patches:
            return
        for v, payload in self.patches if every else self.patches[-1:]:
            self.patch_bytes = session.publish(
                topics.model_patch(v % self.retain), payload, retain=True
            )
        if every:
            for slot in self._stale_slots:
                session.publish(topics.model_patch(slot), b"", retain=True)
            self._stale_slots = range(0)

    @staticmethod
    def describe(payload: bytes) -> str:
        p = ModelPatch.from_bytes(payload)
        return f"patch v{p.from_version}->v{p.to_version} {p.codec} {len(p.delta)} B"
