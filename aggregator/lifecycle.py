"""The round lifecycle every mode shares: open, take updates, close or fail, publish.

One round: publish the task (retained) -> take each update through the intake (validate,
journal with fsync, receipt, fold; the session acknowledges it once the handler returns) ->
close at the round's target, when every online device has answered (at least
``min_devices``), or at the deadline with at least ``min_devices`` -> apply the strategy ->
checkpoint atomically -> export ONNX -> publish the new version (retained) -> open the next
round. A round short of quorum at its deadline fails with a logged reason and a new round
(new id, same base version) opens. A restart resumes the open round from the checkpoint and
the journal.

What differs between modes is in the subclasses (``aggregator.modes``: sync and async;
``aggregator.sharded.mode``: the reducer of shard workers), through the hooks at the end of
this class. Everything runs on the service's loop; no locks. Closing a round is in
``aggregator.closing``, publishing its version in ``aggregator.version_publishing``
(``aggregator.lifecycle_base``: what the parts share).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace

from aggregator.closing import RoundClosing
from aggregator.downlink import DownlinkChain
from aggregator.finetune import FineTune
from aggregator.parts import RoundParts
from aggregator.presence import RevocationWatch
from aggregator.rounds import OpenRound, RoundContext
from aggregator.state import ServiceState
from aggregator.version_publishing import VersionPublishing
from aggregator.weighting import SampleCap
from fedge.envelopes import DeviceState, DeviceStatus, RoundTask
from fedge.tensors import TensorSpec, spec_of
from fedge.topics import Topics
from fedge.transport.base import Cancellable
from fedge.transport.mqtt import publish_packet_size

__all__ = ["RoundLifecycle"]

log = logging.getLogger(__name__)


class RoundLifecycle(RoundClosing, VersionPublishing):
    """The rounds of one service; a subclass per mode supplies the hooks."""

    def __init__(self, parts: RoundParts) -> None:
        self.parts = parts
        self.config = parts.config
        self.session = parts.session
        self.strategy = parts.strategy
        self.publisher = parts.publisher
        self.journal = parts.journal
        self.intake = parts.intake
        self.presence = parts.presence
        self.metrics = parts.metrics
        c = self.config
        codec = None if c.downlink_codec == "full" else c.downlink_codec
        chain = DownlinkChain(
            codec, c.patch_retain, feedback=c.downlink_feedback, seed=c.model.seed
        )
        self.state = ServiceState(parts.state_file, chain)
        if chain.active:
            self.publisher.announce["patch_retain"] = float(c.patch_retain)
        # The ranges the last int8 twin was built from: the next merge is bounded by them
        # (in memory only: the first twin after a restart is trimmed but not bounded).
        self.calib_ranges: dict[str, tuple[float, float]] | None = None
        self.round: OpenRound | None = None
        self.ctx: RoundContext | None = None
        self._deadline: Cancellable | None = None
        self.finetune = FineTune(None)  # bound to the model in restore()
        keyring = parts.keyring
        self._revocations = (
            RevocationWatch(
                self.presence, keyring, parts.loop, self._clear_status, self._maybe_close_early
            )
            if keyring is not None
            else None
        )

    @classmethod
    def updates_topic(cls, topics: Topics) -> str:
        """Where this mode's service reads what devices send (besides their statuses)."""
        return topics.all_updates

    # -- durable state --------------------------------------------------------------------------
    def restore(self) -> None:
        """Load or create the model (slow: torch, ONNX export); resume an open round."""
        st = self.state
        ckpt = st.load(self.config.model)
        self.finetune = FineTune.bind(self.config.model.trainable, st.weights)
        if self.parts.pruner is not None:
            self.parts.pruner.restore(spec_of(st.weights))
        self.journal.discard_through(st.last_round - (1 if ckpt and ckpt.open_task else 0))
        self.publisher.render(st.version, st.downlink.served(st.weights))
        if self.config.rounds and st.version >= self.config.rounds:
            # rounds is the fleet's total (the version to reach), across restarts.
            log.warning(
                "the model is at v%d and rounds is %d (a total across restarts, counted from "
                "v0): nothing to train; raise rounds to train further",
                st.version,
                self.config.rounds,
            )
            self.parts.done.set()
        elif ckpt is not None:
            st.restore_window(ckpt)
            if ckpt.open_task is not None:
                self.parts.loop.call_soon(self._resume_round, RoundTask.from_bytes(ckpt.open_task))

    def _checkpoint(self, counted: tuple[str, ...]) -> None:
        t0 = time.perf_counter()
        self.state.save(self.round, counted=counted, window_tasks=self._window_tasks())
        self.metrics.timing("checkpoint", time.perf_counter() - t0)

    # -- connection and incoming ------------------------------------------------------------------
    def on_connected(self) -> None:
        # Re-publishing is idempotent (same version and hash) and repairs a broker that lost
        # its retained messages.
        self.state.downlink.publish(self.session, self.parts.topics, every=True)
        self.publisher.publish(self.session)
        if self._revocations is not None and not self._revocations.started:
            self._revocations.look()
        if self.parts.done.is_set():
            return
        if self.round is None:
            self._open_first_round()
            return
        if time.time() >= self.round.task.deadline:
            # The deadline passed while we could not reach the broker: devices may not have
            # been able to answer either, so give the round its time again.
            self._extend_round()
        else:
            self.session.publish(self.parts.topics.task, self.round.task.to_bytes(), retain=True)

    def handle(self, topic: str, payload: bytes) -> bool:
        """A message of the mode's own (not an update nor a status); False if not one."""
        return False

    def on_status(self, device: str, status: DeviceStatus) -> None:
        self.presence.update(device, status)
        if status.state == DeviceState.OFFLINE:
            self._maybe_close_early()
        elif device in self.presence.revoked:
            # A revoked device still connected (mutual TLS: the CRL is checked at the
            # handshake only) must not leave an "online" status for dashboards and restarts.
            self._clear_status(device)

    def stop(self) -> None:
        """Stop looking at the key registry (the service is stopping)."""
        if self._revocations is not None:
            self._revocations.stop()

    def _clear_status(self, device: str) -> None:
        """Delete ``device``'s retained status (an empty retained publish)."""
        self.session.publish(self.parts.topics.status(device), b"", qos=1, retain=True)

    def on_update(self, device: str, topic: str, payload: bytes) -> None:
        size = publish_packet_size(topic, len(payload))
        self.metrics.received(device, size)
        if self.round is None:
            self.intake.reject(None, "no_round", f"{device}: no round is open", device)
            return
        self.round.uplink_bytes += size
        if self._fold(device, payload, journal=True) and self.strategy.count >= self._target():
            self._close_round()
        else:
            self._maybe_close_early()

    def _fold(self, device: str, payload: bytes, *, journal: bool) -> bool:
        assert self.ctx is not None
        return self.intake.fold(device, payload, self.ctx, journal=journal)

    # -- opening ----------------------------------------------------------------------------------
    def _open_first_round(self) -> None:
        self._open_round()

    def _open_round(self) -> None:
        now = time.time()
        self.state.last_round += 1
        c = self.config
        hyper = replace(
            c.hyper.to_hyper(),
            qat=c.qat,
            calibrate=c.int8,
            early_stop_patience=c.early_stop_patience,
            val_fraction=c.val_fraction if c.early_stop_patience else 0.0,
        )
        hyper = self.parts.adaptive.hyper(hyper)
        accepts_from = self._accepts_from()
        unsigned = RoundTask(
            round=self.state.last_round,
            base_version=self.state.version,
            deadline=now + c.round_timeout,
            codec=c.codec,
            hyper=replace(hyper, **self.strategy.hyper_overrides()),
            nonce=os.urandom(16),
            selected=self.presence.select(self.state.last_round),
            issued=now,
            accepts_from=accepts_from,
            mask=self.parts.pruner.mask if self.parts.pruner is not None else None,
            trainable=self.finetune.names,
        )
        task = self.publisher.sign_task(unsigned)
        rnd = self._start_round(task)
        # Persist the open round before anyone can answer it: a restart resumes it, and its
        # id is never reused.
        self._checkpoint(counted=())
        self.journal.open(task.round)
        rnd.task_bytes = self.session.publish(self.parts.topics.task, task.to_bytes(), retain=True)
        log.info("round %d open (base v%d)", task.round, task.base_version)

    def _start_round(self, task: RoundTask, resumed: bool = False) -> OpenRound:
        opened = task.issued if resumed and task.issued else time.time()
        rnd = self.round = OpenRound(task, opened, resumed=resumed)
        spec = spec_of(self.state.weights)  # once per round, for every update of it
        self.strategy.begin_round(spec)
        cap = SampleCap(self.config.max_num_samples, self.config.max_sample_ratio)
        self.ctx = RoundContext(
            rnd,
            self.state.version,
            spec,
            self.strategy,
            self._accepting(),
            max_weight=cap.cap(self.state.weight_reference),
        )
        if task.hyper.calibrate:
            from aggregator.calibration import RangeMerger
            from models.int8 import calibration_tensor_names

            rnd.calib = RangeMerger(
                calibration_tensor_names(self.publisher.onnx), previous=self.calib_ranges
            )
        delay = max(0.0, task.deadline - time.time())
        self._deadline = self.parts.loop.call_later(delay, self._on_deadline)
        self._began(rnd, spec)
        return rnd

    def _resume_round(self, task: RoundTask) -> None:
        """Re-open the round a previous process left open, replaying its journal."""
        if task.base_version != self.state.version:
            log.warning(
                "open round %d has base v%d, model is v%d: abandoned",
                task.round,
                task.base_version,
                self.state.version,
            )
            self._checkpoint(counted=())
            return
        rnd = self._start_round(task, resumed=True)
        replayed = self.journal.open(task.round)
        self._replaying(replayed)
        for device, payload in replayed:
            rnd.uplink_bytes += publish_packet_size(self.parts.topics.update(device), len(payload))
            self._fold(device, payload, journal=False)
        log.info("round %d resumed with %d journaled updates", task.round, len(replayed))
        if self.strategy.count >= self._target():
            self._close_round()

    def _extend_round(self) -> None:
        rnd = self.round
        assert rnd is not None
        if self._deadline is not None:
            self._deadline.cancel()
        extended = replace(rnd.task, deadline=time.time() + self.config.round_timeout)
        rnd.task = self.publisher.sign_task(extended)
        self._checkpoint(counted=())
        self._deadline = self.parts.loop.call_later(self.config.round_timeout, self._on_deadline)
        self.session.publish(self.parts.topics.task, rnd.task.to_bytes(), retain=True)
        log.info(
            "round %d: its deadline passed while this service could not reach the broker "
            "(a broker outage, or the service stopped): extended by round_timeout (%g s)",
            rnd.round,
            self.config.round_timeout,
        )

    # -- what a mode decides ----------------------------------------------------------------------
    def _accepts_from(self) -> int | None:
        """The oldest round the new task lets devices still answer; None: only itself."""
        return None

    def _accepting(self) -> dict[int, OpenRound] | None:
        """The rounds the intake accepts updates to, by id; None: only the open one."""
        return None

    def _began(self, rnd: OpenRound, spec: TensorSpec) -> None:
        """The round is open (or resumed): its state, fold target and deadline are set."""

    def _ended(self) -> None:
        """The round closed or failed."""

    def _replaying(self, journaled: list[tuple[str, bytes]]) -> None:
        """Before the journal of a resumed round is folded again."""

    def target(self) -> int:
        """Counted updates that close the open round at once (what the dashboard shows)."""
        return self._target()

    def _target(self) -> int:
        """Counted updates that close the round at once."""
        return self.presence.target(self.round.task if self.round is not None else None)

    def _maybe_close_early(self) -> None:
        """Close before the target when waiting longer gains nothing."""

    def _short_of_quorum(self, rnd: OpenRound) -> None:
        """The deadline came with fewer than ``min_devices`` counted."""
        self._fail_round(
            rnd, f"quorum not met: {self.strategy.count} of {self.config.min_devices} by deadline"
        )

    def _gather(self, rnd: OpenRound) -> None:
        """Bring everything the round counted into the strategy before ``finish``."""

    def _counted_record(self, rnd: OpenRound) -> dict[str, str]:
        return dict(sorted(rnd.counted.items()))

    def _window_tasks(self) -> tuple[bytes, ...]:
        """Tasks of the still-accepted rounds, for the checkpoint."""
        return ()
