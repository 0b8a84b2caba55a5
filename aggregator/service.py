"""The aggregator service: round orchestration over one MQTT session.

One round: publish the task (retained) -> fold validated updates as they arrive -> close at
``target_devices`` counted, or at the deadline with at least ``min_devices`` -> apply the
strategy -> checkpoint atomically -> export ONNX -> publish the new version (retained) -> open
the next round. A round short of quorum at its deadline fails with a logged reason and a new
round (new id, same base version) opens. Everything runs on the mux thread; no locks.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np

from aggregator.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from aggregator.config import AggregatorConfig
from aggregator.evaluation import EvalSet, evaluate_onnx
from aggregator.metrics import MetricsLog
from aggregator.registry import ModelRegistry
from aggregator.rounds import OpenRound
from aggregator.strategies import make_strategy
from aggregator.validation import validate_update
from fedge.envelopes import DeviceState, DeviceStatus, GlobalModel, ModelArch, RoundTask
from fedge.errors import ProtocolError
from fedge.limits import DEFAULT_LIMITS, Limits
from fedge.mqtt import BrokerURL, publish_packet_size
from fedge.mux import Mux, Timer
from fedge.session import Session, SessionOptions
from fedge.tensors import spec_of
from fedge.topics import Topics

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
        self.metrics = MetricsLog(config.metrics_path)
        self.strategy = make_strategy(config.strategy, config.server_lr)
        self.done = threading.Event()
        self.online: set[str] = set()
        self.round: OpenRound | None = None
        self._deadline: Timer | None = None
        self._template: Any = None
        self._model_msg: bytes = b""
        self.model_bytes = 0
        self.version, self.last_round, self.failed_rounds = 0, 0, 0
        self.weights: dict[str, np.ndarray] = {}
        self.session = Session(
            mux,
            BrokerURL.parse(config.broker),
            SessionOptions(config.client_id, config.username, config.password),
            subscriptions=[self.topics.all_updates, self.topics.all_statuses],
            on_message=self._on_message,
            on_connected=self._on_connected,
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
            log.info("aggregator: resumed version %d, last round %d", self.version, self.last_round)
        self._render_model(metrics={})
        if self.config.rounds and self.version >= self.config.rounds:
            self.done.set()
        self.session.start()

    def stop(self) -> None:
        self.mux.call_soon(self.session.close)

    @property
    def latest_model_path(self) -> Any:
        return self.registry.path(self.version)

    # -- model --------------------------------------------------------------------------------
    def _checkpoint(self, counted: tuple[str, ...]) -> None:
        ck = Checkpoint(self.version, self.last_round, self.weights, counted, self.failed_rounds)
        save_checkpoint(self.ckpt_path, ck)

    def _render_model(self, metrics: dict[str, float]) -> dict[str, float]:
        if self._template is None:
            from models.onnx_export import OnnxTemplate

            a = self.arch
            self._template = OnnxTemplate(a.name, a.input_dim, a.num_classes)
        onnx = self._template.render(self.weights)
        if self.eval_set is not None:
            metrics = {**metrics, **evaluate_onnx(onnx, self.eval_set)}
        sha = hashlib.sha256(onnx).hexdigest()
        msg = GlobalModel(self.version, self.arch, onnx, sha, time.time(), metrics)
        self._model_msg = msg.to_bytes()
        if not self.registry.path(self.version).exists():
            meta = {
                "version": self.version,
                "sha256": sha,
                "arch": asdict(self.arch),
                "metrics": metrics,
                "created": msg.created,
                "bytes": len(onnx),
            }
            self.registry.save(self.version, onnx, meta)
        return metrics

    def _publish_model(self) -> None:
        self.model_bytes = self.session.publish(self.topics.model, self._model_msg, retain=True)

    # -- rounds -------------------------------------------------------------------------------
    def _on_connected(self) -> None:
        # Re-publishing is idempotent (same version and hash) and repairs a broker that lost
        # its retained messages.
        self._publish_model()
        if self.done.is_set():
            return
        if self.round is None:
            self._open_round()
        else:
            self.session.publish(self.topics.task, self.round.task.to_bytes(), retain=True)

    def _open_round(self) -> None:
        now = time.time()
        self.last_round += 1
        # Persist the round id before using it: after a restart it is never reused.
        self._checkpoint(counted=())
        c = self.config
        task = RoundTask(
            round=self.last_round,
            base_version=self.version,
            deadline=now + c.round_timeout,
            codec=c.codec,
            hyper=c.hyper.to_hyper(),
            nonce=os.urandom(16),
            selected=None,
            issued=now,
        )
        self.round = OpenRound(task, now)
        self.strategy.begin_round(spec_of(self.weights))
        self.round.task_bytes = self.session.publish(self.topics.task, task.to_bytes(), retain=True)
        self._deadline = self.mux.call_later(c.round_timeout, self._on_deadline)
        log.info("round %d open (base v%d)", task.round, task.base_version)

    def _on_deadline(self) -> None:
        rnd = self.round
        if rnd is None:
            return
        if self.strategy.count >= self.config.min_devices:
            self._close_round()
            return
        self._fail_round(
            rnd, f"quorum not met: {self.strategy.count} of {self.config.min_devices} by deadline"
        )

    def _fail_round(self, rnd: OpenRound, reason: str) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self.failed_rounds += 1
        log.warning("round %d failed: %s", rnd.round, reason)
        self.metrics.write({"round": rnd.round, "failed": reason, "ts": time.time()})
        self.round = None
        self._open_round()

    def _close_round(self) -> None:
        rnd = self.round
        assert rnd is not None
        if self._deadline is not None:
            self._deadline.cancel()
        new = self.strategy.finish(self.weights)
        if not all(np.isfinite(v).all() for v in new.values()):
            # Finite inputs can still overflow float32; never publish or checkpoint that.
            self._fail_round(rnd, "aggregate is not finite (overflow); model kept")
            return
        self.weights = new
        self.version += 1
        self._checkpoint(counted=tuple(rnd.counted))
        metrics = self._render_model(metrics={})
        self._publish_model()
        record = {
            "round": rnd.round,
            "version": self.version,
            "devices": len(rnd.counted),
            "train_loss": rnd.train_loss_sum / max(rnd.samples, 1),
            "samples": rnd.samples,
            "uplink_bytes": rnd.uplink_bytes,
            "model_bytes": self.model_bytes,
            "task_bytes": rnd.task_bytes,
            "seconds": time.time() - rnd.opened_at,
            "rejected": dict(rnd.rejected),
            "ts": time.time(),
            **metrics,
        }
        self.metrics.write(record)
        self.round = None
        if self._on_round is not None:
            self._on_round(record)
        if self.config.rounds and self.version >= self.config.rounds:
            self.done.set()
        else:
            self._open_round()

    # -- incoming -----------------------------------------------------------------------------
    def _on_message(self, topic: str, payload: bytes) -> None:
        device = self.topics.device_of(topic, "update")
        if device is not None:
            self._on_update(device, topic, payload)
            return
        device = self.topics.device_of(topic, "status")
        if device is not None:
            try:
                st = DeviceStatus.from_bytes(payload, self.limits)
            except ProtocolError:
                return
            (self.online.discard if st.state == DeviceState.OFFLINE else self.online.add)(device)

    def _reject(self, rnd: OpenRound | None, reason: str, detail: str) -> None:
        self.metrics.reject(reason)
        if rnd is not None:
            rnd.rejected[reason] = rnd.rejected.get(reason, 0) + 1
        log.warning("rejected update: %s: %s", reason, detail)

    def _on_update(self, device: str, topic: str, payload: bytes) -> None:
        rnd = self.round
        if rnd is None:
            self._reject(None, "no_round", f"{device}: no round is open")
            return
        rnd.uplink_bytes += publish_packet_size(topic, len(payload))
        try:
            acc = validate_update(
                device,
                payload,
                rnd,
                spec_of(self.weights),
                self.limits,
                self.config.max_num_samples,
            )
        except ProtocolError as e:
            self._reject(rnd, e.reason, e.detail)
            return
        if acc.clamped:
            self.metrics.reject("clamped_samples")
        self.strategy.fold(acc.delta, acc.num_samples)
        rnd.counted[device] = acc.update.update_id
        rnd.samples += acc.num_samples
        rnd.train_loss_sum += acc.update.metrics.get("loss", 0.0) * acc.num_samples
        self.metrics.accepted += 1
        if self.strategy.count >= self.config.target_devices:
            self._close_round()
