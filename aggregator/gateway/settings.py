"""``gateway.yaml``: how a site gateway is deployed (``fedge gateway --config gateway.yaml``).

The names follow the site: the gateway's identity on the site broker (username = client id =
the level of its partial topic) is ``gw-<site>``, the bridge's at the centre ``site-<site>``
(``broker_config/site.conf.template``, ``gateway_acl``). The central aggregator lists the
gateways as its ``shard_workers``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from aggregator.sharded.settings import WorkerConfig
from fedge.identity import load_verify_key
from fedge.support.config_io import TLSConfig, load_yaml_config, read_password_file
from fedge.topics import validate_device_id
from fedge.transport.mqtt import BrokerURL

__all__ = ["GatewayConfig", "gateway_name", "load_gateway_config"]


def gateway_name(site: str) -> str:
    """The gateway identity of ``site``: ``gw-<site>``."""
    return validate_device_id(f"gw-{validate_device_id(site)}")


class GatewayConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    broker: str = Field(description="the SITE broker: mqtt://HOST:PORT or mqtts://HOST:PORT")
    fleet: str = "default"
    site: str = Field(description="the site's name; the gateway is gw-<site> on its broker")
    state_dir: Path = Field(description="the gateway's round journal and its seal record")
    password: str | None = None
    password_file: Path | None = Field(default=None, description="file holding the password")
    tls: TLSConfig | None = None
    device_keys: Path | None = Field(
        default=None,
        description="key registry (`fedge ca init`): set = every update must be signed, as "
        "the central aggregator's device_keys",
    )
    aggregator_key: Path | None = Field(
        default=None, description="the central aggregator's public key: unsigned tasks refused"
    )
    # The central aggregator's rules, which its reducer checks on every partial.
    max_num_samples: int = Field(default=100_000, ge=1)
    max_sample_ratio: float = Field(default=4.0, gt=0)
    clip_norm: float = Field(default=0.0, ge=0, description="the strategy's clip_norm")
    session_expiry: int = Field(default=24 * 3600, ge=0)
    max_pending: int = Field(default=10_000, ge=0)

    @field_validator("site")
    @classmethod
    def _site(cls, v: str) -> str:
        gateway_name(v)
        return v

    @field_validator("broker")
    @classmethod
    def _url(cls, v: str) -> str:
        BrokerURL.parse(v)
        return v

    @model_validator(mode="before")
    @classmethod
    def _password_file(cls, raw: object) -> object:
        return read_password_file(raw)

    @property
    def name(self) -> str:
        return gateway_name(self.site)

    def worker_config(self) -> WorkerConfig:
        """The shard worker the gateway is, on its site broker."""
        tls = self.tls
        return WorkerConfig(
            broker=self.broker,
            fleet=self.fleet,
            worker=self.name,
            state_dir=self.state_dir,
            group=self.name,
            password=self.password,
            max_num_samples=self.max_num_samples,
            max_sample_ratio=self.max_sample_ratio,
            clip_norm=self.clip_norm,
            session_expiry=self.session_expiry,
            max_pending=self.max_pending,
            ca_cert=str(tls.ca_cert) if tls else None,
            client_cert=str(tls.client_cert) if tls and tls.client_cert else None,
            client_key=str(tls.client_key) if tls and tls.client_key else None,
            aggregator_key=load_verify_key(self.aggregator_key) if self.aggregator_key else None,
        )


def load_gateway_config(path: Path) -> GatewayConfig:
    return load_yaml_config(path, GatewayConfig)
