"""Where the service is: model version and weights, the last round id used, failed rounds,
the window of still-accepted rounds (async mode), and its checkpoint.

Round ids are never reused (the checkpoint holds the last one used before its task is
published) and the weights change only through a checkpointed version, so a restarted
service continues exactly where the checkpoint says (aggregator/checkpoint.py).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from aggregator.checkpoint import Checkpoint, StateFile
from aggregator.config import ModelConfig
from aggregator.downlink import DownlinkChain
from aggregator.rounds import OpenRound
from fedge.envelopes import RoundTask

__all__ = ["ServiceState"]

log = logging.getLogger(__name__)


class ServiceState:
    def __init__(self, file: StateFile, downlink: DownlinkChain | None = None) -> None:
        self.file = file
        # The device view and its patches (full models only without one).
        self.downlink = downlink if downlink is not None else DownlinkChain(None, 1)
        self.version, self.last_round, self.failed_rounds = 0, 0, 0
        self.weight_reference = 0  # aggregator/weighting.py
        self.weights: dict[str, np.ndarray] = {}
        # Rounds still accepted, by id (async mode; empty otherwise), the open one included.
        self.window: dict[int, OpenRound] = {}

    def load(self, model: ModelConfig) -> Checkpoint | None:
        """Resume from the checkpoint, or create ``model`` (slow: torch) and save version 0.
        Returns the checkpoint resumed from, None for a new model."""
        ckpt = self.file.load()
        if ckpt is None:
            from aggregator.warm_start import initial_weights

            self.weights = initial_weights(model)
            self.downlink.reset(self.weights)
            self.save(None, counted=())
            how = f"warm start from {model.init}" if model.init else f"seed {model.seed}"
            log.info("aggregator: new model %s (%s), version 0", model.name, how)
        else:
            self.version, self.last_round = ckpt.version, ckpt.last_round
            self.weights, self.failed_rounds = ckpt.weights, ckpt.failed_rounds
            self.weight_reference = ckpt.weight_reference
            self.downlink.restore(ckpt.view, list(ckpt.patches), self.weights)
            log.info("aggregator: resumed version %d, last round %d", self.version, self.last_round)
        return ckpt

    def restore_window(self, ckpt: Checkpoint) -> None:
        """Async: the window of still-accepted rounds survives a crash at any point, also
        between a version's checkpoint and the next round's."""
        for raw in ckpt.recent_tasks:
            t = RoundTask.from_bytes(raw)
            counted = dict(ckpt.recent_counted.get(t.round, {}))
            self.window[t.round] = OpenRound(t, time.time(), counted=counted)

    def save(
        self,
        open_round: OpenRound | None,
        *,
        counted: tuple[str, ...],
        window_tasks: tuple[bytes, ...] = (),
    ) -> None:
        """Checkpoint atomically, with the open round's task (resumed after a restart)."""
        ck = Checkpoint(
            self.version,
            self.last_round,
            self.weights,
            counted,
            self.failed_rounds,
            open_round.task.to_bytes() if open_round is not None else None,
            {},
            window_tasks,
            {r: dict(o.counted) for r, o in self.window.items()},
            weight_reference=self.weight_reference,
            view=self.downlink.view if self.downlink.active else None,
            patches=tuple(self.downlink.patches),
        )
        self.file.save(ck)
