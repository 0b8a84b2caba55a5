"""Settings of an edge agent, loaded once from YAML (see examples/agent.yaml)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedge.support.config_io import TLSConfig, load_yaml_config, read_password_file
from fedge.topics import validate_device_id
from fedge.transport.mqtt import BrokerURL

__all__ = ["AgentConfig", "load_agent_config"]


def _default_device_id() -> str:
    # In containers started with --scale, the hostname is the only unique name.
    return os.environ.get("FEDGE_DEVICE_ID") or socket.gethostname().split(".")[0]


class LocalDPConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    clip_norm: float = Field(gt=0)
    noise_multiplier: float = Field(ge=0)


class AgentConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    device_id: str = Field(default_factory=_default_device_id)
    broker: str = "mqtt://127.0.0.1:1883"
    fleet: str = "default"
    username: str | None = None
    password: str | None = None
    password_file: Path | None = Field(
        default=None,
        description="file holding the password (`fedge enroll` writes one); not with password",
    )
    state_dir: Path = Path("fedge-agent-state")
    data: Path = Field(
        description="local training data: an .npz with arrays x and y, or a directory from "
        "`fedge data split`: the file of this device id in its meta.json (--device-ids), else "
        "the first file no other device claimed (edge_agent/data.py)"
    )
    holdout: Path | None = Field(
        default=None,
        description="labelled .npz (x, y) kept out of training, on which release candidates "
        "are shadow-evaluated before this device serves them; unset: the training data",
    )
    models: list[str] = Field(
        default_factory=list,
        description="models of your own this device may train, as package.module:factory "
        "(the aggregator's model.name); registered at start",
    )
    keepalive: int = Field(default=30, ge=5, le=3600)
    signing_key: Path | None = Field(
        default=None, description="this device's Ed25519 key (from `fedge enroll`); signs updates"
    )
    aggregator_key: Path | None = Field(
        default=None,
        description="the aggregator's public key; set = unsigned or wrongly signed models refused",
    )
    tls: TLSConfig | None = None
    local_dp: LocalDPConfig | None = Field(
        default=None, description="clip + Gaussian noise on every delta before it leaves"
    )
    seed: int = 0

    @field_validator("device_id")
    @classmethod
    def _id(cls, v: str) -> str:
        return validate_device_id(v)

    @model_validator(mode="before")
    @classmethod
    def _password_file(cls, raw: object) -> object:
        return read_password_file(raw)

    @field_validator("broker")
    @classmethod
    def _url(cls, v: str) -> str:
        BrokerURL.parse(v)
        return v


def load_agent_config(path: Path) -> AgentConfig:
    return load_yaml_config(path, AgentConfig)
