"""The edge agent: an explicit state machine (`edge_agent.states`) over one MQTT session.

Models arrive through a `ModelReceiver`; updates are built by `edge_agent.uplink`; the agent
keeps what is left: the session, what goes to disk and in which order, and the state. Training
runs on an executor so the MQTT loop keeps serving keepalives; its result comes back to the
loop thread through ``Mux.call_soon``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, Future
from typing import Any

import numpy as np

from edge_agent.data import LocalData
from edge_agent.downlink import Downlink, Patched
from edge_agent.model_cache import ModelCache
from edge_agent.outbox import Outbox
from edge_agent.privacy import LocalDP
from edge_agent.residual import Residual
from edge_agent.secagg import SecAggDevice, SecAggOptions
from edge_agent.serving import ReleaseFollower
from edge_agent.states import AgentCounters, AgentState, next_state
from edge_agent.store import AgentStore, HeldModel
from edge_agent.uplink import TrainOutcome, Uplink, build_upload, calibration
from fedge.chunks import ModelReceiver
from fedge.codecs import Codec, parse_codec
from fedge.envelopes import DeviceState, DeviceStatus, GlobalModel, ModelArch, Receipt, RoundTask
from fedge.errors import ProtocolError
from fedge.identity import SigningKey, VerifyKey
from fedge.limits import DEFAULT_LIMITS, Limits
from fedge.support.faults import crash_point
from fedge.task_check import check_task, plausible_last_round
from fedge.tensors import spec_of
from fedge.topics import Topics
from fedge.transport.base import SessionFactory, SessionRequest
from fedge.transport.mqtt import BrokerURL, publish_packet_size
from fedge.transport.mux import Mux
from fedge.transport.session import MqttSessions

__all__ = ["AgentCounters", "AgentState", "EdgeAgent"]

log = logging.getLogger(__name__)

TrainFn = Callable[..., Any]


class EdgeAgent:
    def __init__(
        self,
        *,
        device_id: str,
        mux: Mux,
        broker: BrokerURL,
        topics: Topics,
        data: LocalData,
        store: AgentStore,
        executor: Executor,
        train_fn: TrainFn | None = None,
        username: str | None = None,
        password: str | None = None,
        keepalive: int = 30,
        seed: int = 0,
        limits: Limits = DEFAULT_LIMITS,
        signing_key: SigningKey | None = None,
        aggregator_key: VerifyKey | None = None,
        tls: tuple[str | None, str | None, str | None] = (None, None, None),
        local_dp: LocalDP | None = None,
        model_cache: ModelCache | None = None,
        session_factory: SessionFactory | None = None,
        holdout: LocalData | None = None,
        secagg: SecAggOptions | None = None,
    ) -> None:
        """``holdout``: labelled samples for shadow evaluation of release candidates (not
        trained on); without it the training data stands in (edge_agent.serving)."""
        self.device_id = device_id
        self.mux = mux
        self.topics = topics
        self.data = data
        self.store = store
        self.executor = executor
        self._train_fn = train_fn
        self.seed = seed
        self.limits = limits
        self.state = AgentState.CONNECTING
        self.counters = AgentCounters()
        self.model: HeldModel | None = store.load_model()
        self._weights: dict[str, np.ndarray] | None = None
        self.task: RoundTask | None = None
        self.last_round = store.last_round()
        held = self.model.version if self.model else None
        if not plausible_last_round(self.last_round, held, limits):
            log.warning(
                "%s: stored last round %d is implausible for model v%d (a forged task?): forgotten",
                device_id,
                self.last_round,
                held,
            )
            self.last_round = 0
            store.set_last_round(0)
        self._aggregator_key = aggregator_key
        self.models = ModelReceiver(
            topics,
            limits,
            verify_key=aggregator_key,
            held=(self.model.version, self.model.sha256) if self.model else None,
        )
        self.downlink = Downlink(
            device_id,
            topics,
            limits,
            aggregator_key,
            holding=self.model is not None,
            state_dir=store.dir,
        )
        self.residual = Residual.load(store.dir)
        self.outbox = Outbox(store.dir)
        self.uplink = Uplink(device_id, seed, limits, local_dp, signing_key)
        self._cache = model_cache or ModelCache()
        self._entry: Any = None  # keeps the shared model version alive while we hold it
        self._resent_outbox = False
        shadow_on = holdout or data
        self.release = ReleaseFollower(
            device_id,
            topics,
            store.dir,
            (shadow_on.x, shadow_on.y),
            verify_key=aggregator_key,
            limits=limits,
            on_change=lambda: self._publish_status(DeviceState.ONLINE),
        )
        # Secure rounds (edge_agent/secagg.py): stage messages and this device's inbox.
        self.secagg = SecAggDevice(
            device_id,
            topics,
            self._publish_secagg,
            limits=limits,
            seed=seed,
            signing_key=signing_key,
            aggregator_key=aggregator_key,
            options=secagg,
        )
        offline = DeviceStatus(device_id, DeviceState.OFFLINE, ts=0.0).to_bytes()
        # The deployment's broker, credentials and TLS unless a factory is given (tests).
        sessions = session_factory or MqttSessions(
            mux,
            broker,
            username if username is not None else device_id,
            password,
            ca_cert=tls[0],
            client_cert=tls[1],
            client_key=tls[2],
        )
        self.session = sessions(
            SessionRequest(
                device_id,
                subscriptions=[
                    *self.downlink.subscriptions(),
                    topics.task,
                    topics.receipt(device_id),
                    topics.release,
                    topics.release_candidate,
                    topics.release_stable,
                    *self.secagg.subscriptions,
                ],
                # Only the newest model, chunk set, task and release matter, and they are
                # retained; the last patches are retained too (edge_agent/downlink.py).
                latest_only=[
                    topics.model,
                    topics.all_model_chunks,
                    topics.all_model_patches,
                    topics.task,
                    topics.release,
                    topics.release_candidate,
                    topics.release_stable,
                ],
                on_message=self._on_message,
                on_connected=self._on_connected,
                keepalive=keepalive,
                will=(topics.status(device_id), offline),
            )
        )
        self.downlink.session = self.session

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self.session.start()

    def stop(self) -> None:
        """Say offline and disconnect (safe from any thread)."""
        self.mux.call_soon(self._stop)

    def _stop(self) -> None:
        last = (self.topics.status(self.device_id), self._status(DeviceState.OFFLINE))
        self.session.close(last=last)

    def _status(self, state: DeviceState) -> bytes:
        version = self.model.version if self.model else None
        r = self.release
        return DeviceStatus(
            self.device_id, state, version, time.time(), r.serving, r.report
        ).to_bytes()

    def _publish_status(self, state: DeviceState) -> None:
        self.counters.tx_status_bytes += self.session.publish(
            self.topics.status(self.device_id), self._status(state), qos=1, retain=True
        )

    def _on_connected(self) -> None:
        self.downlink.on_connected()
        self._publish_status(DeviceState.ONLINE)
        # Every update not yet receipted by the aggregator, after every (re)connect: the broker
        # may have acknowledged it and then lost it in flight (a crash). A resend of an update
        # already counted is refused as a duplicate and receipted again.
        first = not self._resent_outbox
        self._resent_outbox = True
        if self.task is not None:
            self.outbox.drop_before(self.task.oldest_accepted)  # closed: nothing can count them
        for round_id, uid, payload in self.outbox.pending():
            log.info("%s: resending update %s of round %d", self.device_id, uid, round_id)
            self._send(round_id, uid, payload, on_done=None)
            if first and round_id > self.last_round:
                # It was trained and sent before the restart: never train it again.
                self.last_round = round_id
                self.store.set_last_round(round_id)
        if self.state == AgentState.CONNECTING:
            self.state = AgentState.WAITING_MODEL if self.model is None else AgentState.WAITING_TASK
        self._advance()

    # -- incoming -----------------------------------------------------------------------------
    def _on_message(self, topic: str, payload: bytes) -> None:
        qos = 1 if topic == self.topics.receipt(self.device_id) else 0  # latest-only: QoS 0
        size = publish_packet_size(topic, len(payload), qos)
        self.counters.rx_bytes += size
        try:
            if self.secagg.handle(topic, payload):
                return
            if self.downlink.wants(topic):
                self.counters.rx_patch_bytes += size
                self._on_patch(payload)
            elif self.models.wants(topic):
                self.counters.rx_model_bytes += size
                full = self.models.offer(topic, payload)
                if full is not None:
                    self._on_model(full)
            elif topic == self.topics.task and not payload:
                # The aggregator closed the round (protocol §9.5): the next task follows.
                self.task = None
            elif topic == self.topics.task:
                self.counters.rx_task_bytes += size
                task = RoundTask.from_bytes(payload, self.limits)
                self._on_task(check_task(task, self._aggregator_key, self.limits))
            elif self.release.wants(topic):
                self.release.offer(topic, payload)
            elif topic == self.topics.receipt(self.device_id):
                r = Receipt.from_bytes(payload, self.limits, device=self.device_id)
                self.outbox.remove(r.round, r.update_id)
                log.info(
                    "%s: receipt: update %s of round %d %s",
                    self.device_id,
                    r.update_id[:8],
                    r.round,
                    "came too late (its site was cut off): in no version" if r.late else "counted",
                )
        except ProtocolError as e:
            if topic == self.topics.task:
                self.counters.tasks_rejected += 1
            elif self.release.wants(topic):
                self.counters.releases_rejected += 1
            elif self.downlink.wants(topic):
                self.counters.patches_rejected += 1
            else:
                self.counters.models_rejected += 1
            log.warning("%s: ignored message on %s: %s", self.device_id, topic, e)

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

    def _on_task(self, t: RoundTask) -> None:
        if self.task is not None and t.round < self.task.round:
            return  # a stale retained/redelivered task; the newer one stands
        self.task = t
        self.secagg.on_task(t)
        self.downlink.on_task_base(t.base_version, self.model.version if self.model else None)
        self.outbox.drop_before(t.oldest_accepted)  # those rounds closed: no receipt will come
        self._advance()

    def _skip_round(self, t: RoundTask, why: str, level: int = logging.ERROR) -> None:
        """Give up on a round for good (persisted): retrying would fail the same way."""
        log.log(level, "%s: skipping round %d: %s", self.device_id, t.round, why)
        self.counters.rounds_skipped += 1
        self.last_round = t.round
        self.store.set_last_round(t.round)
        self.state = AgentState.IDLE

    # -- the state machine --------------------------------------------------------------------
    def _advance(self) -> None:
        """Decide what to do with the model and task we hold; called after every event."""
        if self.state in (AgentState.CONNECTING, AgentState.TRAINING, AgentState.UPLOADING):
            return
        t, m = self.task, self.model
        state = next_state(
            m, t, last_round=self.last_round, device_id=self.device_id, now=time.time()
        )
        if state != AgentState.TRAINING or t is None or m is None:
            self.state = state
            return
        try:
            codec = parse_codec(t.codec)
        except ValueError as e:
            self._skip_round(t, f"cannot honour codec: {e}")
            return
        problem = self.data.width_problem(m.arch.input_dim)
        if problem:
            self._skip_round(t, problem)
            return
        weights = self._global_weights(m)
        try:
            keep = t.mask.keep(spec_of(weights)) if t.mask else None
        except ValueError as e:
            self._skip_round(t, f"cannot honour mask: {e}")
            return
        self.state = AgentState.TRAINING
        seed = self.seed * 1_000_003 + t.round
        fut = self.executor.submit(self._train, m.arch, weights, t, seed, keep)
        fut.add_done_callback(lambda f: self.mux.call_soon(self._trained, t, m, weights, codec, f))

    def _global_weights(self, m: HeldModel) -> dict[str, np.ndarray]:
        if self._weights is None:
            from models.onnx_weights import read_initializers

            self._weights = read_initializers(m.onnx)
        return self._weights

    def _train(
        self,
        arch: ModelArch,
        weights: Mapping[str, np.ndarray],
        t: RoundTask,
        seed: int,
        keep: Mapping[str, np.ndarray] | None = None,
    ) -> Any:
        train = self._train_fn
        if train is None:
            from edge_agent.trainer import train_local

            train = train_local
        # Keyword arguments only when used: a train function need not know them.
        kw: dict[str, Any] = {"qat": True} if t.hyper.qat else {}
        if keep is not None:
            kw["mask"] = keep  # pruned weights stay exactly zero (protocol §5.2, mask)
        return train(arch, weights, self.data.x, self.data.y, t.hyper, seed, **kw)

    def _trained(
        self,
        t: RoundTask,
        m: HeldModel,
        base: Mapping[str, np.ndarray],
        codec: Codec,
        fut: Future[TrainOutcome | None],
    ) -> None:
        try:
            result = fut.result()
        except Exception as e:
            log.exception("%s: local training failed in round %d", self.device_id, t.round)
            self._skip_round(t, f"training failed: {e}")
            self._advance()
            return
        if result is None:
            # A train function may decline the round (a simulated straggler that misses the
            # deadline): nothing is sent, and the round is over for this device.
            self._skip_round(t, "local training returned no result", logging.INFO)
            self._advance()
            return
        log.info(
            "%s: round %d: trained %d epochs on %d samples in %.2f s (loss %.4f)",
            self.device_id,
            t.round,
            getattr(result, "epochs", 0) or t.hyper.epochs,
            result.num_samples,
            result.seconds,
            result.loss,
        )
        if self.secagg.takes(t):
            # Secure round: the delta leaves only masked (edge_agent/secagg.py).
            self.secagg.submit(t, base, result.weights, result.num_samples, self.uplink.local_dp)
            self._uploaded(t, True)
            return
        calib = calibration(self.uplink, m.onnx, self.data.x, t)
        try:
            up = build_upload(self.uplink, base, result, t, codec, self.residual, calib=calib)
        except (ValueError, ProtocolError) as e:
            self._skip_round(t, f"cannot encode with {codec.name}: {e}")
            self._advance()
            return
        uid = up.update.update_id
        # Outbox first, then the residual: a crash in between resends the update and re-adds
        # a residual that was in fact sent (bounded, harmless); the reverse order would lose
        # both the update and the residual's mass.
        self.outbox.put(t.round, uid, up.payload)
        crash_point("after_outbox")
        self.residual = up.residual
        if up.save_residual:
            up.residual.save(self.store.dir)
        self.state = AgentState.UPLOADING
        # Said before the publish: a refusal or a failure to send is logged after it.
        log.info(
            "%s: round %d: sending update %s: %d bytes, codec %s",
            self.device_id,
            t.round,
            uid[:8],
            len(up.payload),
            codec.name,
        )
        self._send(t.round, uid, up.payload, on_done=lambda ok: self._uploaded(t, ok))

    def _send(
        self, round_id: int, uid: str, payload: bytes, on_done: Callable[[bool], None] | None
    ) -> None:
        def done(ok: bool, why: str) -> None:
            # The broker took it: it stays in the outbox until the aggregator's receipt. A
            # refusal is final (e.g. the ACL): resending would loop, so it leaves the outbox.
            if ok:
                self.store.record_acked(round_id, uid)
            else:
                log.warning(
                    "%s: broker refused update of round %d: %s", self.device_id, round_id, why
                )
                self.outbox.remove(round_id, uid)
            if on_done is not None:
                on_done(ok)

        try:
            size = self.session.publish(
                self.topics.update(self.device_id), payload, qos=1, on_done=done
            )
        except ProtocolError as e:
            log.error("%s: update of round %d not sent: %s", self.device_id, round_id, e)
            done(False, str(e))
            return
        self.counters.tx_bytes += size

    def _publish_secagg(self, topic: str, payload: bytes, retain: bool) -> None:
        try:
            self.counters.tx_bytes += self.session.publish(topic, payload, qos=1, retain=retain)
        except ProtocolError as e:
            log.error("%s: secure-round message not sent: %s", self.device_id, e)

    def _uploaded(self, t: RoundTask, ok: bool) -> None:
        if ok:
            self.counters.updates_sent += 1
        # Either way this round is over for us: retrying a refused update would loop.
        self.last_round = t.round
        self.store.set_last_round(t.round)
        self.state = AgentState.IDLE
        self._advance()
