"""How a device follows the model: full models until patches flow, then patches only.

A device that holds no model (or lost the chain) is subscribed to the full model topics
(``{p}/model/global`` and its chunks). Once it holds a verified model and a verified patch
shows the chain reaches that very version (its result hash equals the held weights' hash),
it unsubscribes from them and follows ``{p}/model/patch/+`` alone: in steady state it
receives one patch per version. It subscribes to the full model again (a *resync*) when

- a patch starts after the oldest one still retained and past what it holds
  (``held < retained_from``: it missed more versions than the retained patches cover),
- a patch does not apply (the hash of its result differs: a corrupted or diverged local
  model),
- a task names a newer base version than the patches it holds can reach (patches lost, or
  the aggregator sends full models only).

After a full model it unsubscribes again at once when it has seen a verified patch of the
fleet or the model's announcement carries ``patch_retain`` in its metrics (the aggregator
sends patches; not signed, so a forged one costs at most a resync).

Patches arrive in any order (a retained burst after a subscribe): those that do not apply yet
wait, at most ``MAX_PENDING``. Every patch is verified (signature, then size before decoding)
before it is kept. The arithmetic is ``fedge.patches``; writing the new model to disk and
adopting it is the agent's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedge.envelopes import ModelPatch
from fedge.errors import ProtocolError
from fedge.identity import VerifyKey
from fedge.limits import Limits
from fedge.patches import apply_patch, verify_patch, weights_sha256
from fedge.support.fsutil import atomic_write
from fedge.topics import Topics
from fedge.transport.base import RoleSession

__all__ = ["MAX_PENDING", "Downlink", "Patched"]

log = logging.getLogger(__name__)

MAX_PENDING = 64

Weights = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Patched:
    """The model after one or more patches: what the agent adopts."""

    version: int
    weights: dict[str, np.ndarray]
    sha256: bytes  # weights_sha256


class Downlink:
    def __init__(
        self,
        device_id: str,
        topics: Topics,
        limits: Limits,
        verify_key: VerifyKey | None,
        *,
        holding: bool,
        state_dir: Path | None = None,
    ) -> None:
        self.device_id = device_id
        self.topics = topics
        self.limits = limits
        self.verify_key = verify_key
        # Whether the device followed patches when it stopped (a fleet on full models never
        # does): a device that holds a model and did starts on patches alone.
        self._flag = None if state_dir is None else Path(state_dir) / "downlink.json"
        self.full = not (holding and self._followed())
        self.session: RoleSession | None = None
        self._pending: dict[int, ModelPatch] = {}  # by from_version
        self._held_sha: tuple[int, bytes] | None = None  # (version, weights_sha256)
        self.seen_patch = False  # a verified patch arrived: this fleet sends patches
        self.patches_applied = 0
        self.resyncs = 0

    @property
    def full_topics(self) -> list[str]:
        return [self.topics.model, self.topics.all_model_chunks]

    def subscriptions(self) -> list[str]:
        """What the session subscribes to at start for the model."""
        patches = [self.topics.all_model_patches]
        return [*self.full_topics, *patches] if self.full else patches

    def wants(self, topic: str) -> bool:
        return self.topics.device_of(topic, "model/patch") is not None

    def on_connected(self) -> None:
        # A persistent session may still hold full-model subscriptions from before a restart.
        if not self.full and self.session is not None:
            self.session.unsubscribe(self.full_topics)

    def _followed(self) -> bool:
        try:
            return bool(json.loads(self._flag.read_text())["patches"]) if self._flag else False
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def _remember(self) -> None:
        if self._flag is not None:
            atomic_write(self._flag, json.dumps({"patches": not self.full}).encode())

    # -- decisions ------------------------------------------------------------------------------
    def resync(self, why: str, level: int = logging.WARNING) -> None:
        """Take the full model again (once until it arrives)."""
        if self.full:
            return
        self.full = True
        self._remember()
        self.resyncs += 1
        log.log(level, "%s: resynchronising with the full model: %s", self.device_id, why)
        if self.session is not None:
            self.session.subscribe(self.full_topics)

    def _follow(self) -> None:
        if not self.full:
            return
        self.full = False
        self._remember()
        log.info("%s: model follows patches only", self.device_id)
        if self.session is not None:
            self.session.unsubscribe(self.full_topics)

    def _sha(self, version: int, weights: Weights) -> bytes:
        if self._held_sha is None or self._held_sha[0] != version:
            self._held_sha = (version, weights_sha256(weights))
        return self._held_sha[1]

    # -- incoming -------------------------------------------------------------------------------
    def offer(self, payload: bytes, held: tuple[int, Weights] | None) -> Patched | None:
        """A message on a patch topic; ``held`` the version and weights the device holds.

        Returns the newest model the patches reach, or None. ``ProtocolError`` for a patch
        refused (malformed, unsigned, forged, too large)."""
        if not payload:
            return None  # a retained patch being cleared
        p = ModelPatch.from_bytes(payload, self.limits)
        verify_patch(p, self.verify_key)
        self.seen_patch = True
        if len(self._pending) >= MAX_PENDING and p.from_version not in self._pending:
            self._pending.pop(min(self._pending))
        self._pending[p.from_version] = p
        return self.advance(held)

    def adopted_full(self, announces_patches: bool) -> None:
        """A full model is held: follow patches from it if this fleet sends them (a verified
        patch was seen, or the model's announcement says ``patch_retain``)."""
        if announces_patches or self.seen_patch:
            self._follow()

    def advance(self, held: tuple[int, Weights] | None) -> Patched | None:
        """Apply what the pending patches allow from ``held`` (also after a full model)."""
        if held is None:
            return None
        version, weights = held
        for v in [v for v in self._pending if v < version]:
            p = self._pending[v]
            if p.to_version == version and p.sha256 == self._sha(version, weights):
                self._follow()  # the chain reaches the very weights we hold
            if p.to_version <= version:
                del self._pending[v]
        newest = max((p.to_version for p in self._pending.values()), default=version)
        if newest > version and version not in self._pending:
            oldest = max(p.retained_from for p in self._pending.values())
            if version < oldest:
                self.resync(f"holds v{version}, retained patches start at v{oldest}")
            return None  # else the missing patches are still on their way
        start, current = version, dict(weights)
        while version in self._pending:
            p = self._pending.pop(version)
            try:
                current = apply_patch(current, p, self.limits)
            except ProtocolError as e:
                if e.reason != "bad_hash":
                    raise
                self.resync(f"patch v{p.to_version} does not apply: {e.detail}")
                break
            version = p.to_version
            self._held_sha = (version, p.sha256)
            self.patches_applied += 1
        if version == start:
            return None
        self._follow()
        return Patched(version, current, self._sha(version, current))

    def on_task_base(self, base_version: int, held_version: int | None) -> None:
        """A task for a newer base than patches can bring: only the full model can."""
        if (
            held_version is not None
            and base_version > held_version
            and held_version not in self._pending
        ):
            why = f"task for v{base_version}, holds v{held_version}, no patch from it"
            self.resync(why, logging.WARNING if self.seen_patch else logging.INFO)
