"""The edge agent: an explicit state machine (`edge_agent.states`) over one MQTT session.

Models arrive through a `ModelReceiver`; updates are built by `edge_agent.uplink`; the agent
keeps what is left: the session, what goes to disk and in which order, and the state. Training
runs on an executor so the MQTT loop keeps serving keepalives; its result comes back to the
loop thread through ``Mux.call_soon``.

The agent is built from parts, one concept each (``edge_agent.agent_base``): incoming-message
routing (``routing``), model adoption (``adoption``), a round's training and upload
(``round_work``); this module keeps the construction, the connection and the status.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Executor
from typing import Any

import numpy as np

from edge_agent.adoption import ModelAdoption
from edge_agent.agent_base import TrainFn
from edge_agent.data import LocalData
from edge_agent.downlink import Downlink
from edge_agent.model_cache import ModelCache
from edge_agent.outbox import Outbox
from edge_agent.privacy import LocalDP
from edge_agent.residual import Residual
from edge_agent.round_work import RoundWork
from edge_agent.routing import MessageRouting
from edge_agent.secagg import SecAggDevice, SecAggOptions
from edge_agent.serving import ReleaseFollower
from edge_agent.states import AgentCounters, AgentState
from edge_agent.store import AgentStore, HeldModel
from edge_agent.uplink import Uplink
from fedge.chunks import ModelReceiver
from fedge.envelopes import DeviceState, DeviceStatus, RoundTask
from fedge.identity import SigningKey, VerifyKey
from fedge.limits import DEFAULT_LIMITS, Limits
from fedge.task_check import plausible_last_round
from fedge.topics import Topics
from fedge.transport.base import SessionFactory, SessionRequest
from fedge.transport.mqtt import BrokerURL
from fedge.transport.mux import Mux
from fedge.transport.session import MqttSessions

__all__ = ["AgentCounters", "AgentState", "EdgeAgent"]

log = logging.getLogger(__name__)


class EdgeAgent(MessageRouting, ModelAdoption, RoundWork):
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
        self._status_refused = False  # logged once
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
        topic = self.topics.status(self.device_id)

        def done(ok: bool, reason: str) -> None:
            # A fleet name the broker's ACL does not allow: PUBACK 0x87 and no model ever
            # comes; without this line the agent waited silently forever.
            if not ok and not self._status_refused:
                self._status_refused = True
                log.error(
                    "%s: the broker refused this device's status on %s (%s): is the fleet "
                    "name right (the aggregator's fleet; the broker's ACL allows its CA's "
                    "fleet only)?",
                    self.device_id,
                    topic,
                    reason,
                )

        self.counters.tx_status_bytes += self.session.publish(
            topic, self._status(state), qos=1, retain=True, on_done=done
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
