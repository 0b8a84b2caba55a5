"""The aggregator service: one object wiring the configuration into its parts.

``Aggregator`` builds the strategy, the publisher, the journal, the metrics sinks, the
session (from a ``SessionFactory``: the deployment's broker by default, an in-memory one in
unit tests), the intake and the round policy of the configured mode, then routes each
incoming message: updates and statuses to the policy, partial sums to the sharded reducer.
The rounds themselves are in ``aggregator.lifecycle`` and the mode policies
(``aggregator.modes``, ``aggregator.sharded.mode``). Everything runs on the loop's thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from aggregator.adaptive import AdaptiveLR
from aggregator.checkpoint import StateFile
from aggregator.config import AggregatorConfig
from aggregator.evaluation import EvalSet
from aggregator.intake import UpdateIntake
from aggregator.journal import RoundJournal
from aggregator.keyring import KeyRing
from aggregator.lifecycle import RoundLifecycle
from aggregator.metrics import MetricsFanout, MetricsLog, MetricsSink
from aggregator.modes import AsyncRounds, SyncRounds
from aggregator.observe.fleetview import FleetSnapshot
from aggregator.parts import RoundCallback, RoundParts
from aggregator.presence import Presence
from aggregator.pruning import Pruner
from aggregator.publisher import ModelPublisher
from aggregator.registry import ModelRegistry
from aggregator.rollout import RolloutController
from aggregator.rollout_requests import POLL_SECONDS, handle_requests
from aggregator.rounds import OpenRound
from aggregator.secure_rounds import SecureRounds
from aggregator.sharded.mode import ShardedRounds
from aggregator.sharded.rounds import ShardedRound
from aggregator.strategies import STRATEGIES, make_strategy
from aggregator.strategies.base import Strategy
from fedge.envelopes import DeviceStatus, ModelArch
from fedge.errors import ConfigError, ProtocolError
from fedge.identity import load_signing_key
from fedge.limits import DEFAULT_LIMITS, MAX_STATUS_BYTES, Limits
from fedge.topics import Topics
from fedge.transport.base import Cancellable, Loop, SessionFactory, SessionRequest
from fedge.transport.mqtt import BrokerURL
from fedge.transport.session import MqttSessions

if TYPE_CHECKING:
    from aggregator.observe.live import LiveView
    from aggregator.observe.server import ObserveServer

__all__ = ["Aggregator", "RoundCallback"]

log = logging.getLogger(__name__)


class Aggregator:
    def __init__(
        self,
        config: AggregatorConfig,
        mux: Loop,
        *,
        eval_set: EvalSet | None = None,
        on_round: RoundCallback | None = None,
        limits: Limits = DEFAULT_LIMITS,
        session_factory: SessionFactory | None = None,
        metrics_sinks: Sequence[MetricsSink] = (),
    ) -> None:
        """``metrics_sinks``: reported to besides the JSON lines file (``self.metrics``)."""
        if ":" in config.model.name:  # a model of your own (models.zoo.register_factory)
            from models.zoo import register_factory

            try:
                register_factory(config.model.name)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        self.config = config
        self.mux = mux
        self.topics = Topics(config.fleet)
        self.limits = limits
        self.eval_set = eval_set
        if eval_set is None and config.eval_data is not None:
            self.eval_set = EvalSet.from_npz(config.eval_data, config.model.input_dim)
        self.state_dir = config.state_dir
        self.registry = ModelRegistry(self.state_dir / "models")
        self.journal = RoundJournal(self.state_dir / "journal")
        self.metrics = MetricsLog(config.metrics_path)
        self.observe = _observed(config)
        extra = [*metrics_sinks, *(self.observe.sinks if self.observe else ())]
        sink = MetricsFanout([self.metrics, *extra]) if extra else self.metrics
        self._sink: MetricsSink = sink
        self.strategy = _strategy(config)
        self.adaptive = AdaptiveLR(config, self.strategy, has_eval=self.eval_set is not None)
        self.pruner = _pruner(config, self.strategy)
        self.keyring = KeyRing(config.device_keys) if config.device_keys else None
        self.publisher = _publisher(config, self.topics, self.registry, self.eval_set)
        self.done = threading.Event()
        mode = _mode(config)
        sessions = session_factory or _mqtt_sessions(config, mux)
        self.session = sessions(
            SessionRequest(
                config.client_id,
                subscriptions=[mode.updates_topic(self.topics), self.topics.all_statuses],
                on_message=self._on_message,
                on_connected=self._on_connected,
                # An update is acknowledged only once it is in the journal.
                manual_ack=True,
                # Devices must not park payloads in the broker: see _on_message.
                watch_retained=(self.topics.all_updates, self.topics.all_statuses),
                # A second aggregator of the fleet (or another fleet's under the same
                # username) and this one would kick each other off forever.
                detect_takeover=True,
            )
        )
        self.intake = UpdateIntake(
            session=self.session,
            topics=self.topics,
            journal=self.journal,
            metrics=sink,
            limits=limits,
            max_num_samples=config.max_num_samples,
            keyring=self.keyring,
        )
        self.presence = Presence(config)
        self.rounds: RoundLifecycle = mode(self._parts(sink, on_round))
        self.web: ObserveServer | None = None
        self.rollout = RolloutController(
            self.state_dir,
            topics=self.topics,
            registry=self.registry,
            arch=self.publisher.arch,
            presence=self.presence,
            session=self.session,
            signing_key=self.publisher.signing_key,
            metrics=sink,
        )
        self._requests_timer: Cancellable | None = None

    def _parts(self, sink: MetricsSink, on_round: RoundCallback | None) -> RoundParts:
        return RoundParts(
            config=self.config,
            loop=self.mux,
            session=self.session,
            topics=self.topics,
            limits=self.limits,
            strategy=self.strategy,
            adaptive=self.adaptive,
            publisher=self.publisher,
            registry=self.registry,
            journal=self.journal,
            state_file=StateFile(
                self.ckpt_path,
                self.strategy,
                self.adaptive,
                *([self.pruner] if self.pruner else []),
            ),
            intake=self.intake,
            presence=self.presence,
            metrics=sink,
            keyring=self.keyring,
            done=self.done,
            on_round=on_round,
            pruner=self.pruner,
        )

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Load or create the model (slow: torch, ONNX export), then connect."""
        self.rounds.restore()
        if self.observe is not None:
            self.web = self.observe.serve(self.mux, self._snapshot)
            log.info("metrics and dashboard on %s", self.web.url)
        self.session.start()
        self.mux.call_soon(self._poll_requests)

    def stop(self) -> None:
        """Stop serving the dashboard (at once, from the caller's thread), then the session."""
        if self.web is not None:
            self.web.stop()
        self.mux.call_soon(self._stop)

    def _snapshot(self) -> FleetSnapshot:
        assert self.observe is not None
        return self.observe.view.snapshot(
            config=self.config, presence=self.presence, rounds=self.rounds, keyring=self.keyring
        )

    def _poll_requests(self) -> None:
        """Operators' rollout requests (aggregator/rollout_requests.py), on the loop."""
        handle_requests(self.state_dir, self.rollout.run)
        self._requests_timer = self.mux.call_later(POLL_SECONDS, self._poll_requests)

    def _stop(self) -> None:
        if self._requests_timer is not None:
            self._requests_timer.cancel()
        self.rounds.stop()
        self.journal.close()
        self.session.close()

    # -- incoming -----------------------------------------------------------------------------
    def _on_connected(self) -> None:
        self.rounds.on_connected()
        self.rollout.on_connected()

    def _on_message(self, topic: str, payload: bytes) -> None:
        if self.rounds.handle(topic, payload):
            return
        device = self.topics.device_of(topic, "update")
        if device is not None:
            if self.session.current_retained:
                # An update topic never holds a retained copy: a device parking one there
                # grows the broker's memory and database (issue 17). Cleared, then handled.
                self._clear_retained(topic, "retained_update", len(payload))
            self.rounds.on_update(device, topic, payload)
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
            self.rounds.on_status(device, st)
            self.rollout.on_status(device, st)

    def _clear_retained(self, topic: str, why: str, size: int) -> None:
        """Delete the retained copy a device left on ``topic`` (an empty retained publish)."""
        log.warning("cleared the retained message on %s: %s, %d bytes", topic, why, size)
        self._sink.event("retained_cleared")
        self.session.publish(topic, b"", qos=1, retain=True)

    # -- what tests, the simulation and the CLI read ----------------------------------------
    @property
    def arch(self) -> ModelArch:
        return self.publisher.arch

    @property
    def ckpt_path(self) -> Path:
        return self.state_dir / "checkpoint.msgpack"

    @property
    def version(self) -> int:
        return self.rounds.state.version

    @property
    def last_round(self) -> int:
        return self.rounds.state.last_round

    @property
    def failed_rounds(self) -> int:
        return self.rounds.state.failed_rounds

    @property
    def weights(self) -> dict[str, np.ndarray]:
        return self.rounds.state.weights

    @property
    def round(self) -> OpenRound | None:
        """The round open now, if any."""
        return self.rounds.round

    @property
    def known(self) -> set[str]:
        return self.presence.known

    @property
    def online(self) -> set[str]:
        return self.presence.online

    @property
    def sharded(self) -> ShardedRound | None:
        """The reducer's side of sharded aggregation (``shard_workers`` set), else None."""
        return self.rounds.sharded if isinstance(self.rounds, ShardedRounds) else None

    @property
    def latest_model_path(self) -> Path:
        return self.registry.path(self.version)

    @property
    def model_bytes(self) -> int:
        return self.publisher.model_bytes


def _strategy(config: AggregatorConfig) -> Strategy:
    """The configured strategy, refused when the rounds could never satisfy it."""
    opts = {k: str(v) for k, v in config.strategy_opts.items()}
    strategy = make_strategy(
        config.strategy, opts, server_lr=config.server_lr, target_devices=config.target_devices
    )
    if strategy.min_updates > config.min_devices:
        raise ConfigError(
            f"strategy {config.strategy} needs at least {strategy.min_updates} updates "
            f"per round; raise min_devices (now {config.min_devices})"
        )
    if config.shard_workers and not strategy.sums_linearly:
        linear = ", ".join(n for n, cls in STRATEGIES.items() if cls.sums_linearly)
        raise ConfigError(
            f"strategy {config.strategy} cannot run sharded: shard workers send sums, so "
            f"only the linear strategies ({linear}) can"
        )
    return strategy


def _publisher(
    config: AggregatorConfig, topics: Topics, registry: ModelRegistry, eval_set: EvalSet | None
) -> ModelPublisher:
    m = config.model
    return ModelPublisher(
        ModelArch(m.name, m.input_dim, m.num_classes),
        topics,
        registry,
        eval_set=eval_set,
        signing_key=load_signing_key(config.signing_key) if config.signing_key else None,
        chunk_bytes=config.model_chunk_bytes,
    )


def _mode(config: AggregatorConfig) -> type[RoundLifecycle]:
    """The round policy of the configured mode (the config refuses sharded async)."""
    if config.shard_workers:
        return ShardedRounds
    if config.secure_aggregation is not None:
        return SecureRounds
    return AsyncRounds if config.mode == "async" else SyncRounds


def _observed(config: AggregatorConfig) -> LiveView | None:
    """The Prometheus and dashboard sinks when ``metrics_port`` is set, else None."""
    if config.metrics_port is None:
        return None
    from aggregator.observe.live import LiveView

    return LiveView(config.metrics_bind, config.metrics_port, codec=config.codec)


def _mqtt_sessions(config: AggregatorConfig, mux: Loop) -> MqttSessions:
    """The deployment's broker, credentials and TLS files, from the configuration."""
    tls = config.tls
    return MqttSessions(
        mux,
        BrokerURL.parse(config.broker),
        config.username,
        config.password,
        ca_cert=str(tls.ca_cert) if tls else None,
        client_cert=str(tls.client_cert) if tls and tls.client_cert else None,
        client_key=str(tls.client_key) if tls and tls.client_key else None,
    )


def _pruner(config: AggregatorConfig, strategy: Strategy) -> Pruner | None:
    if config.pruning is None:
        return None
    return Pruner(config.pruning, config.model.name, strategy)
