"""The aggregator service: round orchestration over one MQTT session.

One round: publish the task (retained) -> validate each update, append it to the round
journal (fsync), fold it, and only then let the session acknowledge it to the broker -> close
at ``target_devices`` counted, when every online device has answered (at least
``min_devices``), or at the deadline with at least ``min_devices`` -> apply the strategy ->
checkpoint atomically -> export ONNX -> publish the new version (retained) -> open the next
round. A round short of quorum at its deadline fails with a logged reason and a new round
(new id, same base version) opens. A restart resumes the open round from the checkpoint and
the journal. Everything runs on the mux thread; no locks.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from aggregator.adaptive import AdaptiveLR
from aggregator.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from aggregator.config import AggregatorConfig
from aggregator.evaluation import EvalSet
from aggregator.intake import UpdateIntake
from aggregator.journal import RoundJournal
from aggregator.keyring import KeyRing
from aggregator.metrics import MetricsLog
from aggregator.publisher import ModelPublisher
from aggregator.registry import ModelRegistry
from aggregator.rounds import OpenRound
from aggregator.selection import select_clients
from aggregator.sharded.partials import ShardPolicy, ShardTopics
from aggregator.sharded.reducer import Merged
from aggregator.sharded.rounds import ShardedRound
from aggregator.strategies import STRATEGIES, make_strategy
from aggregator.strategies.streaming import StreamingStrategy
from fedge.envelopes import (
    DeviceState,
    DeviceStatus,
    ModelArch,
    RoundTask,
)
from fedge.errors import AggregationError, ConfigError, ProtocolError
from fedge.identity import load_signing_key
from fedge.limits import DEFAULT_LIMITS, MAX_STATUS_BYTES, Limits
from fedge.tensors import spec_of
from fedge.topics import Topics
from fedge.transport.mqtt import BrokerURL, publish_packet_size
from fedge.transport.mux import Mux, Timer
from fedge.transport.session import Session, SessionOptions

__all__ = ["Aggregator"]

log = logging.getLogger(__name__)

RoundCallback = Callable[[dict[str, Any]], None]


class Aggregator:
    def __init__(
        self,
        config: AggregatorConfig,
        mux: Mux,
        *,
        eval_set: EvalSet | None = None,
        on_round: RoundCallback | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.config = config
        self.mux = mux
        self.topics = Topics(config.fleet)
        self.limits = limits
        self.arch = ModelArch(config.model.name, config.model.input_dim, config.model.num_classes)
        self.eval_set = eval_set
        if eval_set is None and config.eval_data is not None:
            self.eval_set = EvalSet.from_npz(config.eval_data)
        self._on_round = on_round
        self.state_dir = config.state_dir
        self.ckpt_path = self.state_dir / "checkpoint.msgpack"
        self.registry = ModelRegistry(self.state_dir / "models")
        self.journal = RoundJournal(self.state_dir / "journal")
        self.metrics = MetricsLog(config.metrics_path)
        opts = {k: str(v) for k, v in config.strategy_opts.items()}
        self.strategy = make_strategy(
            config.strategy, opts, server_lr=config.server_lr, target_devices=config.target_devices
        )
        if self.strategy.min_updates > config.min_devices:
            raise ConfigError(
                f"strategy {config.strategy} needs at least {self.strategy.min_updates} updates "
                f"per round; raise min_devices (now {config.min_devices})"
            )
        if config.shard_workers and not self.strategy.sums_linearly:
            linear = ", ".join(n for n, cls in STRATEGIES.items() if cls.sums_linearly)
            raise ConfigError(
                f"strategy {config.strategy} cannot run sharded: shard workers send sums, so "
                f"only the linear strategies ({linear}) can"
            )
        self.adaptive = AdaptiveLR(config, self.strategy, has_eval=self.eval_set is not None)
        self.known: set[str] = set()
        self.is_async = config.mode == "async"
        # Async: every round still accepted, by id (the open one included).
        self.recent: dict[int, OpenRound] = {}
        if self.is_async:
            from aggregator.strategies.staleness import StalenessWeight

            self.strategy.set_staleness_weight(StalenessWeight.parse(config.staleness_weight))
        self.done = threading.Event()
        self.online: set[str] = set()
        self.round: OpenRound | None = None
        self._deadline: Timer | None = None
        self.version, self.last_round, self.failed_rounds = 0, 0, 0
        self.weights: dict[str, np.ndarray] = {}
        # The ranges the last int8 twin was built from: the next merge is bounded by them.
        self.calib_ranges: dict[str, tuple[float, float]] | None = None
        self.keyring = KeyRing(config.device_keys) if config.device_keys else None
        self.publisher = ModelPublisher(
            self.arch,
            self.topics,
            self.registry,
            eval_set=self.eval_set,
            signing_key=load_signing_key(config.signing_key) if config.signing_key else None,
            chunk_bytes=config.model_chunk_bytes,
        )
        tls = config.tls
        self.session = Session(
            mux,
            BrokerURL.parse(config.broker),
            SessionOptions(
                config.client_id,
                config.username,
                config.password,
                # An update is acknowledged only once it is in the journal.
                manual_ack=True,
                ca_cert=str(tls.ca_cert) if tls else None,
                client_cert=str(tls.client_cert) if tls and tls.client_cert else None,
                client_key=str(tls.client_key) if tls and tls.client_key else None,
                # Devices must not park payloads in the broker: see _on_message.
                watch_retained=(self.topics.all_updates, self.topics.all_statuses),
            ),
            subscriptions=[
                ShardTopics(self.topics).all_partials
                if config.shard_workers
                else self.topics.all_updates,
                self.topics.all_statuses,
            ],
            on_message=self._on_message,
            on_connected=self._on_connected,
        )
        self.intake = UpdateIntake(
            session=self.session,
            topics=self.topics,
            journal=self.journal,
            metrics=self.metrics,
            strategy=self.strategy,
            limits=limits,
            max_num_samples=config.max_num_samples,
            keyring=self.keyring,
        )
        self.sharded: ShardedRound | None = None
        self.workers_seen: set[str] = set()  # shard workers that announced themselves
        if config.shard_workers:
            self.sharded = ShardedRound(
                self.topics,
                config.shard_workers,
                self.session,
                mux,
                poll=config.shard_poll,
                limits=limits,
                on_merged=self._on_merged,
                # The workers must enforce what this service would: refused otherwise.
                policy=ShardPolicy(
                    signed=self.keyring is not None,
                    clip_norm=float(self.strategy.options.clip_norm),
                    max_num_samples=config.max_num_samples,
                ),
            )

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Load or create the model (slow: torch, ONNX export), then connect."""
        ckpt = load_checkpoint(self.ckpt_path)
        if ckpt is None:
            from models.torch_state import to_numpy_state
            from models.zoo import build_model

            m = self.config.model
            self.weights = to_numpy_state(build_model(m.name, m.input_dim, m.num_classes, m.seed))
            self._checkpoint(counted=())
            log.info("aggregator: new model %s, version 0", m.name)
        else:
            self.version, self.last_round = ckpt.version, ckpt.last_round
            self.weights, self.failed_rounds = ckpt.weights, ckpt.failed_rounds
            self._load_state(ckpt.state)
            log.info("aggregator: resumed version %d, last round %d", self.version, self.last_round)
        self.journal.discard_through(self.last_round - (1 if ckpt and ckpt.open_task else 0))
        self.publisher.render(self.version, self.weights)
        if self.config.rounds and self.version >= self.config.rounds:
            self.done.set()
        elif ckpt is not None:
            # Async: the window of still-accepted rounds survives a crash at any point,
            # also between a version's checkpoint and the next round's.
            for raw in ckpt.recent_tasks:
                t = RoundTask.from_bytes(raw)
                counted = dict(ckpt.recent_counted.get(t.round, {}))
                self.recent[t.round] = OpenRound(t, time.time(), counted=counted)
            if ckpt.open_task is not None:
                self.mux.call_soon(self._resume_round, RoundTask.from_bytes(ckpt.open_task))
        self.session.start()

    def stop(self) -> None:
        self.mux.call_soon(self._stop)

    def _stop(self) -> None:
        self.journal.close()
        self.session.close()

    @property
    def latest_model_path(self) -> Any:
        return self.registry.path(self.version)

    @property
    def model_bytes(self) -> int:
        return self.publisher.model_bytes

    # -- durable state ------------------------------------------------------------------------
    def _checkpoint(self, counted: tuple[str, ...]) -> None:
        open_task = self.round.task.to_bytes() if self.round is not None else None
        state = {f"strategy.{k}": _plain(v) for k, v in self.strategy.state_dict().items()}
        state.update(self.adaptive.state_dict())
        recent = tuple(r.task.to_bytes() for r in self.recent.values()) if self.is_async else ()
        ck = Checkpoint(
            self.version,
            self.last_round,
            self.weights,
            counted,
            self.failed_rounds,
            open_task,
            state,
            recent,
            {r: dict(o.counted) for r, o in self.recent.items()},
        )
        save_checkpoint(self.ckpt_path, ck)

    def _load_state(self, state: dict[str, Any]) -> None:
        def part(prefix: str) -> dict[str, Any]:
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

        if part("strategy."):
            self.strategy.load_state_dict(part("strategy."))
        self.adaptive.load_state_dict(state)

    def _publish_model(self) -> None:
        self.publisher.publish(self.session)

    # -- rounds -------------------------------------------------------------------------------
    def _on_connected(self) -> None:
        # Re-publishing is idempotent (same version and hash) and repairs a broker that lost
        # its retained messages.
        self._publish_model()
        if self.done.is_set():
            return
        if self.round is None:
            self._open_first_round()
            return
        if time.time() >= self.round.task.deadline:
            # The deadline passed while we could not reach the broker: devices may not have
            # been able to answer either, so give the round its time again.
            self._extend_round()
        else:
            self.session.publish(self.topics.task, self.round.task.to_bytes(), retain=True)

    def _open_first_round(self) -> None:
        """Open a round unless a shard worker has never announced itself: an update
        published before any worker subscribed would have no subscriber and be dropped."""
        missing = sorted(set(self.config.shard_workers) - self.workers_seen)
        if missing:
            log.info("waiting for shard workers %s before the first round", ", ".join(missing))
            return
        self._open_round()

    def _open_round(self) -> None:
        now = time.time()
        self.last_round += 1
        c = self.config
        hyper = replace(
            c.hyper.to_hyper(),
            qat=c.qat,
            calibrate=c.int8,
            early_stop_patience=c.early_stop_patience,
            val_fraction=c.val_fraction if c.early_stop_patience else 0.0,
        )
        hyper = self.adaptive.hyper(hyper)
        accepts_from = None
        if self.is_async:  # rounds _start_round keeps accepting, and this one
            oldest = self.version - c.max_staleness
            kept = [r for r, o in self.recent.items() if o.task.base_version >= oldest]
            accepts_from = min(kept, default=self.last_round)
        task = RoundTask(
            round=self.last_round,
            base_version=self.version,
            deadline=now + c.round_timeout,
            codec=c.codec,
            hyper=replace(hyper, **self.strategy.hyper_overrides()),
            nonce=os.urandom(16),
            selected=self._select(),
            issued=now,
            accepts_from=accepts_from,
        )
        self._start_round(task)
        # Persist the open round before anyone can answer it: a restart resumes it, and its
        # id is never reused.
        self._checkpoint(counted=())
        self.journal.open(task.round)
        assert self.round is not None
        self.round.task_bytes = self.session.publish(self.topics.task, task.to_bytes(), retain=True)
        log.info("round %d open (base v%d)", task.round, task.base_version)

    def _select(self) -> tuple[str, ...] | None:
        """A seeded sample of known devices; None (everyone) until devices are known."""
        c = self.config
        if c.clients_per_round is None or len(self.known) <= c.clients_per_round:
            return None
        import numpy.random as npr

        rng = npr.default_rng([c.selection_seed, self.last_round])
        return (
            select_clients(
                sorted(self.known),
                self.online,
                count=c.clients_per_round,
                over_select=c.over_select,
                rng=rng,
            )
            or None
        )

    @property
    def _target(self) -> int:
        rnd = self.round
        if rnd is not None and rnd.task.selected is not None:
            return min(
                self.config.target_devices,
                self.config.clients_per_round or 10**9,
                len(rnd.task.selected),
            )
        return self.config.target_devices

    def _start_round(self, task: RoundTask) -> None:
        self.round = OpenRound(task, time.time())
        self.strategy.begin_round(spec_of(self.weights))
        if self.is_async:
            self.recent[task.round] = self.round
            oldest = self.version - self.config.max_staleness
            for r in [r for r, o in self.recent.items() if o.task.base_version < oldest]:
                del self.recent[r]
        if task.hyper.calibrate:
            from aggregator.calibration import RangeMerger
            from models.int8 import calibration_tensor_names

            self.round.calib = RangeMerger(
                calibration_tensor_names(self.publisher.onnx), previous=self.calib_ranges
            )
        delay = max(0.0, task.deadline - time.time())
        self._deadline = self.mux.call_later(delay, self._on_deadline)
        if self.sharded is not None:
            self.sharded.begin(task, spec_of(self.weights))

    def _resume_round(self, task: RoundTask) -> None:
        """Re-open the round a previous process left open, replaying its journal."""
        if task.base_version != self.version:
            log.warning(
                "open round %d has base v%d, model is v%d: abandoned",
                task.round,
                task.base_version,
                self.version,
            )
            self._checkpoint(counted=())
            return
        self._start_round(task)
        replayed = self.journal.open(task.round)
        if self.is_async:
            self.intake.uncount(replayed, self.recent)
        for device, payload in replayed:
            self._fold(device, payload, journal=False)
        log.info("round %d resumed with %d journaled updates", task.round, len(replayed))
        target = self.config.async_buffer if self.is_async else self._target
        if self.strategy.count >= target:
            self._close_round()

    def _extend_round(self) -> None:
        rnd = self.round
        assert rnd is not None
        if self._deadline is not None:
            self._deadline.cancel()
        rnd.task = replace(rnd.task, deadline=time.time() + self.config.round_timeout)
        self._checkpoint(counted=())
        self._deadline = self.mux.call_later(self.config.round_timeout, self._on_deadline)
        self.session.publish(self.topics.task, rnd.task.to_bytes(), retain=True)
        log.info("round %d deadline extended after a broker outage", rnd.round)

    def _on_deadline(self) -> None:
        rnd = self.round
        if rnd is None:
            return
        if not self.session.connected:
            return  # _on_connected extends the round once the broker is back
        if self.sharded is not None:
            self.sharded.request_now()  # _on_merged decides, past the deadline
            return
        if self.strategy.count >= self.config.min_devices:
            self._close_round()
            return
        if self.is_async:
            self._extend_round()  # no barrier to fail: keep collecting
            return
        self._fail_round(
            rnd, f"quorum not met: {self.strategy.count} of {self.config.min_devices} by deadline"
        )

    def _fail_round(self, rnd: OpenRound, reason: str) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        if self.sharded is not None:
            self.sharded.stop()
        self.failed_rounds += 1
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

    def _close_round(self, merged: Merged | None = None) -> None:
        rnd = self.round
        assert rnd is not None
        if self._deadline is not None:
            self._deadline.cancel()
        try:
            if merged is not None:
                self._take_merged(rnd, merged)
            new = self.strategy.finish(self.weights)
        except AggregationError as e:
            self._fail_round(rnd, f"aggregation failed: {e}")
            return
        if not all(np.isfinite(v).all() for v in new.values()):
            # Finite inputs can still overflow float32; never publish or checkpoint that.
            self._fail_round(rnd, "aggregate is not finite (overflow); model kept")
            return
        self.weights = new
        self.version += 1
        self.round = None
        if self.sharded is not None:
            self.sharded.stop()
        self._checkpoint(counted=tuple(rnd.counted))
        self.journal.discard_through(rnd.round)
        metrics: dict[str, Any] = dict(self.publisher.render(self.version, self.weights))
        if rnd.calib is not None:
            ranges = rnd.calib.merged() if rnd.calib.reports else None
            metrics.update(self.publisher.render_int8(self.version, ranges))
            self.calib_ranges = ranges or self.calib_ranges
        self._publish_model()
        if self.config.keep_versions:
            self.registry.prune(self.config.keep_versions)
        metrics.update(self.strategy.round_metrics())
        self.adaptive.step(metrics, rnd.task.hyper.lr)
        if self.adaptive:
            # The schedules stepped on this version's accuracy, known only after the export:
            # checkpoint again so a crash now does not forget the step.
            self._checkpoint(counted=tuple(rnd.counted))
        record = {
            "round": rnd.round,
            "version": self.version,
            # device -> update id: the audit trail the fault suite checks for loss/duplicates.
            "counted": dict(sorted(rnd.counted.items()))
            if not self.is_async
            else {f"{d}@{r}": u for d, r, u, _ in rnd.folded},
            **rnd.record(),
            "model_bytes": self.model_bytes,
            "seconds": time.time() - rnd.opened_at,
            "ts": time.time(),
            **metrics,
        }
        self.metrics.write(record)
        if self._on_round is not None:
            self._on_round(record)
        if self.config.rounds and self.version >= self.config.rounds:
            self.done.set()
        else:
            self._open_round()

    def _maybe_close_early(self) -> None:
        """Close when every online device has answered: waiting for the deadline gains nothing."""
        rnd = self.round
        if rnd is None or self.is_async or self.strategy.count < self.config.min_devices:
            return
        if len(self.known) < self._target:
            return  # not every expected device has announced itself yet: it may still answer
        waiting = {d for d in self.online if rnd.task.asks(d)} - set(rnd.counted)
        if not waiting:
            self._close_round()

    # -- sharded: the merge of the workers' partial sums ---------------------------------------
    def _on_merged(self, m: Merged) -> None:
        """Seal on a merge that meets the target (or, past the deadline, the quorum); close
        on the sealed (final) merge."""
        rnd = self.round
        assert self.sharded is not None
        if rnd is None or m.round != rnd.round:
            return
        c = self.config
        if m.final:
            if m.count >= c.min_devices:
                self._close_round(merged=m)
            else:  # devices counted twice were counted once: the quorum may go
                self._fail_round(rnd, f"quorum not met: {m.count} of {c.min_devices} (sharded)")
            return
        waiting = {d for d in self.online if rnd.task.asks(d)} - set(m.counted)
        everyone = len(self.known) >= self._target and not waiting
        past_deadline = time.time() >= rnd.task.deadline
        if m.count >= self._target or (m.count >= c.min_devices and (everyone or past_deadline)):
            self.sharded.seal()
        elif past_deadline:
            self._fail_round(
                rnd, f"quorum not met: {m.count} of {c.min_devices} by deadline (sharded)"
            )

    def _on_worker_status(self, worker: str, st: DeviceStatus) -> None:
        # A retained status, online or offline, means the worker's session (and with it its
        # shared subscription) exists: the broker keeps its share of updates meanwhile.
        if st.state == DeviceState.OFFLINE:
            log.warning("shard worker %s is offline; its share waits for it", worker)
        first = worker not in self.workers_seen
        self.workers_seen.add(worker)
        if first and self.round is None and self.session.connected and not self.done.is_set():
            self._open_first_round()

    def _take_merged(self, rnd: OpenRound, m: Merged) -> None:
        """Load the merged sums into the strategy and the round's bookkeeping."""
        assert isinstance(self.strategy, StreamingStrategy)
        self.strategy.fold_sum(m.sums, m.total_weight, m.count)
        rnd.counted = dict(m.counted)
        rnd.uplink_bytes = m.uplink_bytes
        rnd.samples = round(m.total_weight)
        rnd.train_loss_sum = m.loss_sum
        for reason, n in m.rejected.items():
            rnd.rejected[reason] = rnd.rejected.get(reason, 0) + n
            self.metrics.reject(reason, n)
        rnd.folded = [(d, rnd.round, u, 0) for d, u in m.counted.items()]
        self.metrics.accepted += m.count

    # -- incoming -----------------------------------------------------------------------------
    def _on_message(self, topic: str, payload: bytes) -> None:
        if self.sharded is not None and self.sharded.handle(topic, payload):
            return
        device = self.topics.device_of(topic, "update")
        if device is not None:
            if self.session.current_retained:
                # An update topic never holds a retained copy: a device parking one there
                # grows the broker's memory and database (issue 17). Cleared, then handled.
                self._clear_retained(topic, "retained_update", len(payload))
            self._on_update(device, topic, payload)
            return
        device = self.topics.device_of(topic, "status")
        if device is not None:
            try:
                if len(payload) > MAX_STATUS_BYTES:
                    raise ProtocolError("too_large", f"{len(payload)} bytes > {MAX_STATUS_BYTES}")
                st = DeviceStatus.from_bytes(payload, self.limits)
            except ProtocolError as e:
                if payload and self.session.current_retained:
                    self._clear_retained(topic, f"bad_status ({e.reason})", len(payload))
                return
            if device in self.config.shard_workers:
                self._on_worker_status(device, st)
                return
            self.known.add(device)
            if st.state == DeviceState.OFFLINE:
                self.online.discard(device)
                self._maybe_close_early()
            else:
                self.online.add(device)

    def _clear_retained(self, topic: str, why: str, size: int) -> None:
        """Delete the retained copy a device left on ``topic`` (an empty retained publish)."""
        log.warning("cleared the retained message on %s: %s, %d bytes", topic, why, size)
        self.metrics.event("retained_cleared")
        self.session.publish(topic, b"", qos=1, retain=True)

    def _on_update(self, device: str, topic: str, payload: bytes) -> None:
        if self.round is None:
            self.intake.reject(None, "no_round", f"{device}: no round is open")
            return
        self.round.uplink_bytes += publish_packet_size(topic, len(payload))
        target = self.config.async_buffer if self.is_async else self._target
        if self._fold(device, payload, journal=True) and self.strategy.count >= target:
            self._close_round()
        elif not self.is_async:
            self._maybe_close_early()

    def _fold(self, device: str, payload: bytes, *, journal: bool) -> bool:
        rnd = self.round
        assert rnd is not None
        return self.intake.fold(
            device,
            payload,
            building=rnd,
            recent=self.recent if self.is_async else None,
            version=self.version,
            spec=spec_of(self.weights),
            journal=journal,
        )


def _plain(v: Any) -> Any:
    """Strategy state values for msgpack: float32 arrays stay arrays, numpy scalars -> Python."""
    if isinstance(v, np.ndarray):
        return v.astype(np.float32)
    if isinstance(v, np.generic):
        return v.item()
    return v
