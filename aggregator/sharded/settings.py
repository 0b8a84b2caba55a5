"""How a shard worker is deployed: its settings, and the sessions they make."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedge.identity import VerifyKey
from fedge.topics import validate_device_id
from fedge.transport.base import Loop, SessionFactory
from fedge.transport.mqtt import BrokerURL
from fedge.transport.session import MqttSessions

__all__ = ["WorkerConfig", "worker_sessions"]


@dataclass(frozen=True)
class WorkerConfig:
    broker: str
    fleet: str
    worker: str  # broker username = client id = partial topic level, e.g. "aggregator-0"
    state_dir: Path  # the worker's round journal
    group: str = "aggregators"
    password: str | None = None
    max_num_samples: int = 100_000  # the aggregator's clamp of reported sample counts
    max_sample_ratio: float = 4.0  # the aggregator's cap relative to the last round's median
    clip_norm: float = 0.0  # norm bounding per update, as the strategies' clip_norm
    session_expiry: int = 24 * 3600
    max_pending: int = 10_000  # updates held while the worker has no open round
    ca_cert: str | None = None  # mqtts://: the CA to trust; mutual TLS: cert and key
    client_cert: str | None = None
    client_key: str | None = None
    # The aggregator's public key: tasks not signed by it are refused (fedge.task_check);
    # None: tasks are taken as they come (an unsigned fleet).
    aggregator_key: VerifyKey | None = None

    def __post_init__(self) -> None:
        validate_device_id(self.worker)
        validate_device_id(self.group)
        if self.max_num_samples < 1 or self.clip_norm < 0 or self.max_pending < 0:
            raise ValueError("max_num_samples must be >= 1, clip_norm and max_pending >= 0")


def worker_sessions(config: WorkerConfig, mux: Loop) -> SessionFactory:
    """Sessions of a worker deployed with its ``WorkerConfig``: its name is its username."""
    return MqttSessions(
        mux,
        BrokerURL.parse(config.broker),
        config.worker,
        config.password,
        ca_cert=config.ca_cert,
        client_cert=config.client_cert,
        client_key=config.client_key,
    )
