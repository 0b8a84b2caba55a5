"""Settings of the aggregator service, loaded once from YAML (see examples/aggregator.yaml)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from aggregator.prune_config import PruningConfig
from fedge.codecs import parse_codec
from fedge.envelopes import HYPER_BOUNDS, TrainHyper
from fedge.support.config_io import TLSConfig, load_yaml_config, read_password_file
from fedge.transport.mqtt import BrokerURL

# What `fedge simulate` picks for the robust strategies, which need dense updates.
DENSE_CODEC = "int8+zstd"

__all__ = [
    "DENSE_CODEC",
    "AggregatorConfig",
    "HyperConfig",
    "ModelConfig",
    "SecureAggregationConfig",
    "TLSConfig",
    "codec_problem",
    "load_aggregator_config",
    "secagg_problem",
]

_STRICT = ConfigDict(frozen=True, extra="forbid")


def _hyper_field(name: str, default: float, **kw: Any) -> Any:
    """A ``Field`` bounded like ``TrainHyper.<name>``: the contract's ``HYPER_BOUNDS``."""
    b = HYPER_BOUNDS[name]
    return Field(
        default=default,
        gt=b.lo if b.lo_open else None,
        ge=None if b.lo_open else b.lo,
        lt=b.hi if b.hi_open else None,
        le=None if b.hi_open else b.hi,
        **kw,
    )


class ModelConfig(BaseModel):
    model_config = _STRICT
    name: str = "mlp"
    input_dim: int = Field(default=64, ge=1)
    num_classes: int = Field(default=10, ge=2)
    seed: int = 0
    init: Path | None = Field(
        default=None,
        description="warm start a new fleet (no checkpoint yet) from an ONNX file, e.g. a "
        "version in another aggregator's registry (STATE_DIR/models/vNNNNNN.onnx); its "
        "tensors must match the model",
    )
    trainable: list[str] | None = Field(
        default=None,
        description="fine-tune only the tensors these glob patterns name (e.g. ['fc3.*']); "
        "devices train and send only those, the others stay exactly as they are; None: all",
    )

    @field_validator("trainable")
    @classmethod
    def _patterns(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or not all(p.strip() for p in v)):
            raise ValueError("trainable: list at least one non-empty pattern, or leave it unset")
        return v


class HyperConfig(BaseModel):
    """Local training asked of devices each round."""

    model_config = _STRICT
    epochs: int = _hyper_field("epochs", 5)
    batch_size: int = _hyper_field("batch_size", 32)
    lr: float = _hyper_field("lr", 0.1)
    momentum: float = _hyper_field("momentum", 0.0)
    weight_decay: float = _hyper_field("weight_decay", 0.0)
    prox_mu: float = _hyper_field("prox_mu", 0.0)

    def to_hyper(self) -> TrainHyper:
        return TrainHyper(**self.model_dump())


class PlateauSettings(BaseModel):
    model_config = _STRICT
    factor: float = Field(default=0.5, gt=0, lt=1)
    patience: int = Field(default=3, ge=0)
    threshold: float = Field(default=1e-3, ge=0)
    cooldown: int = Field(default=0, ge=0)
    min_lr: float = Field(default=1e-4, gt=0)


class SecureAggregationConfig(BaseModel):
    """``secure_aggregation:``: rounds in which the aggregator learns only the sum
    (fedge.secagg; docs/security.md "Secure aggregation")."""

    model_config = _STRICT
    value_bits: int = Field(default=8, ge=2, le=24, description="bits per quantized value")
    clip: float = Field(default=0.5, gt=0, description="each delta coordinate is clipped to +-clip")
    weight_cap: int = Field(
        default=256, ge=1, description="sample counts above this weigh as this much"
    )
    max_devices: int | None = Field(
        default=None, ge=2, description="most inputs a round sums (ring headroom); None: target"
    )
    degree: int | None = Field(
        default=None, ge=2, description="neighbours per device; None: 2*ceil(1.5*log2 n)"
    )
    threshold: float = Field(
        default=0.5, ge=0.5, lt=1, description="shares needed: floor(threshold*degree)+1"
    )
    advertise_timeout: float = Field(default=15.0, gt=0, description="seconds for key adverts")
    share_timeout: float = Field(default=15.0, gt=0, description="seconds for sealed shares")
    unmask_timeout: float = Field(default=15.0, gt=0, description="seconds for unmask replies")


class AggregatorConfig(BaseModel):
    model_config = _STRICT

    broker: str = "mqtt://127.0.0.1:1883"
    fleet: str = "default"
    username: str = "aggregator"
    password: str | None = None
    password_file: Path | None = Field(
        default=None,
        description="file holding the password (`fedge enroll` writes one); not with password",
    )
    client_id: str = "aggregator"
    state_dir: Path = Path("fedge-aggregator-state")
    model: ModelConfig = ModelConfig()
    hyper: HyperConfig = HyperConfig()
    codec: str = "fp32"
    strategy: str = "fedavg"
    strategy_opts: dict[str, str | int | float] = Field(
        default_factory=dict, description="KEY: VALUE options of the strategy (`fedge strategies`)"
    )
    server_lr: float | None = Field(default=None, gt=0, description="None: the strategy's own")
    clients_per_round: int | None = Field(
        default=None, ge=1, description="devices asked per round (seeded sample); None = all"
    )
    over_select: float = Field(default=0.0, ge=0, le=1, description="extra fraction asked")
    selection_seed: int = 0
    adaptive_lr: PlateauSettings | None = Field(
        default=None,
        description="reduce the devices' learning rate when central accuracy plateaus",
    )
    adaptive_server_lr: PlateauSettings | None = Field(
        default=None,
        description="reduce the strategy's server_lr when central accuracy plateaus",
    )
    early_stop_patience: int = _hyper_field(
        "early_stop_patience",
        0,
        description="devices stop local training after this many epochs without a better "
        "validation loss; 0 = off",
    )
    val_fraction: float = _hyper_field(
        "val_fraction", 0.1, description="share of local data devices hold out for it"
    )
    shard_workers: tuple[str, ...] = Field(
        default=(),
        description="shard worker names (fedge shard-worker); non-empty: this service reads "
        "no updates and reduces the workers' partial sums",
    )
    shard_poll: float = Field(
        default=1.0, gt=0, description="seconds between partial-sum requests in a round"
    )
    shard_leave_after: float = Field(
        default=0.0,
        ge=0,
        description="site gateways as shard_workers: seconds past the deadline after which a "
        "gateway not heard from is left out of the round (its devices get late receipts); "
        "0 = wait for every worker",
    )
    mode: Literal["sync", "async"] = Field(
        default="sync",
        description="sync: rounds with a barrier; async: FedBuff, a version every async_buffer "
        "updates, stale updates down-weighted",
    )
    async_buffer: int = Field(default=10, ge=1, description="FedBuff K: updates per version")
    max_staleness: int = Field(default=8, ge=0, description="async: older updates are dropped")
    staleness_weight: str = Field(default="poly:0.5", description="poly:A | const | hinge:A,B")
    int8: bool = Field(
        default=False, description="publish an int8 QDQ model calibrated from devices' ranges"
    )
    qat: bool = Field(default=False, description="ask devices to train quantization-aware")
    pruning: PruningConfig | None = Field(
        default=None, description="gradual magnitude pruning (aggregator/pruning.py); None = off"
    )
    rounds: int = Field(default=0, ge=0, description="stop after this many versions; 0 = forever")
    target_devices: int = Field(default=10, ge=1, description="close a round when this many count")
    min_devices: int = Field(default=2, ge=1, description="quorum needed at the deadline")
    round_timeout: float = Field(default=120.0, gt=0, description="seconds from task to deadline")
    max_num_samples: int = Field(default=100_000, ge=1, description="clamp for reported counts")
    max_sample_ratio: float = Field(
        default=4.0,
        ge=0,
        description="an update weighs at most this times the previous round's median "
        "sample count (0 = only max_num_samples)",
    )
    keep_versions: int = Field(
        default=0, ge=0, description="model versions kept in the registry; 0 = all"
    )
    downlink_codec: str = Field(
        default="full",
        description="how new versions reach devices: full (the signed ONNX every version) or a "
        "codec for signed model patches with server-side error feedback, e.g. "
        "topk:0.05+int8+zstd (docs/protocol.md, model patches)",
    )
    patch_retain: int = Field(
        default=8, ge=1, le=1000, description="patches kept retained for devices catching up"
    )
    downlink_feedback: bool = Field(
        default=True,
        description="carry what a patch did not send into the next one (server-side error "
        "feedback); false: the server continues from the devices' weights",
    )
    model_chunk_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=1024,
        le=15 * 1024 * 1024,
        description="models whose announcement is larger are sent as chunks of this size",
    )
    device_keys: Path | None = Field(
        default=None,
        description="key registry (CA/keys from `fedge ca init`); set = every update must be "
        "signed by its device's enrolled key",
    )
    signing_key: Path | None = Field(
        default=None, description="the aggregator's Ed25519 key; set = every model is signed"
    )
    tls: TLSConfig | None = None
    secure_aggregation: SecureAggregationConfig | None = Field(
        default=None, description="set: the aggregator sees masked vectors and the sum only"
    )
    eval_data: Path | None = Field(default=None, description=".npz with x, y for central eval")
    metrics_file: Path | None = Field(default=None, description="default: STATE_DIR/metrics.jsonl")
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="serve /metrics (Prometheus), /api/fleet and the dashboard (/) on this "
        "port; None = off; 0 = any free port",
    )
    metrics_bind: str = Field(
        default="127.0.0.1",
        description="address the metrics port listens on; 0.0.0.0 exposes the read-only "
        "dashboard to the network",
    )

    @model_validator(mode="before")
    @classmethod
    def _password_file(cls, raw: object) -> object:
        return read_password_file(raw)

    @field_validator("broker")
    @classmethod
    def _url(cls, v: str) -> str:
        BrokerURL.parse(v)
        return v

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, v: str) -> str:
        from aggregator.strategies import STRATEGIES

        if v not in STRATEGIES:
            raise ValueError(f"unknown strategy {v!r}; choose one of: {', '.join(STRATEGIES)}")
        return v

    @field_validator("downlink_codec")
    @classmethod
    def _downlink_codec(cls, v: str) -> str:
        return "full" if v.strip().lower() == "full" else parse_codec(v).name

    @field_validator("codec")
    @classmethod
    def _codec(cls, v: str) -> str:
        return parse_codec(v).name

    @model_validator(mode="after")
    def _quorum(self) -> AggregatorConfig:
        problem = codec_problem(self.strategy, self.codec)
        if problem:
            raise ValueError(problem)
        if self.min_devices > self.target_devices:
            raise ValueError(
                f"min_devices ({self.min_devices}) must not exceed target_devices "
                f"({self.target_devices})"
            )
        if self.shard_workers:
            from fedge.topics import validate_device_id

            for w in self.shard_workers:
                validate_device_id(w)
            if len(set(self.shard_workers)) != len(self.shard_workers):
                raise ValueError(f"shard_workers must be distinct, got {self.shard_workers}")
            if self.mode == "async" or self.int8:
                raise ValueError(
                    "shard_workers works with mode: sync and int8: false (the workers do not "
                    "forward staleness or calibration ranges)"
                )
        if self.model.trainable is not None and (
            self.secure_aggregation is not None or self.pruning is not None
        ):
            raise ValueError(
                "model.trainable does not combine with secure_aggregation or pruning yet: "
                "fine-tune without them"
            )
        if self.secure_aggregation is not None:
            problem = secagg_problem(self)
            if problem:
                raise ValueError(problem)
        return self

    @property
    def metrics_path(self) -> Path:
        return self.metrics_file or self.state_dir / "metrics.jsonl"


def codec_problem(strategy: str, codec: str) -> str | None:
    """Why ``strategy`` cannot aggregate ``codec``'s updates, or None: the robust strategies
    compare updates coordinate by coordinate, and a top-k update is zero almost everywhere."""
    from aggregator.strategies import STRATEGIES

    cls = STRATEGIES.get(strategy)
    if cls is None or not cls.dense_updates or not parse_codec(codec).name.startswith("topk:"):
        return None
    return (
        f"strategy {strategy} compares updates coordinate by coordinate, and a {codec} update "
        f"is zero almost everywhere: use a dense codec (e.g. {DENSE_CODEC}) or a linear strategy"
    )


def secagg_problem(c: AggregatorConfig) -> str | None:
    """Why ``c`` cannot run secure rounds, or None."""
    import math

    from aggregator.strategies import STRATEGIES

    sa = c.secure_aggregation
    assert sa is not None
    linear = ", ".join(n for n, cls in STRATEGIES.items() if cls.sums_linearly)
    linear += ", dp-fedavg"
    dp = c.strategy == "dp-fedavg"  # noise on the sum: devices clip, the aggregator adds noise
    if not (STRATEGIES[c.strategy].sums_linearly or dp):
        return (
            f"secure_aggregation: strategy {c.strategy} needs each device's update and the "
            f"aggregator sees only the sum; use one of {linear}"
        )
    if not dp and float(c.strategy_opts.get("clip_norm", 0) or 0) > 0:
        return (
            "secure_aggregation: clip_norm bounds each update's norm in the clear, which the "
            "aggregator no longer sees; devices clip each coordinate to secure_aggregation.clip"
        )
    if c.codec.startswith("topk:"):
        return f"secure_aggregation: codec {c.codec} sparsifies; masked vectors are dense"
    if c.mode != "sync" or c.shard_workers or c.int8:
        return "secure_aggregation works with mode: sync, no shard_workers and int8: false"
    n = sa.max_devices or c.target_devices
    if sa.value_bits + math.ceil(math.log2(n)) > 32:
        return f"secure_aggregation: value_bits + ceil(log2 {n}) must be at most 32"
    if sa.advertise_timeout + sa.share_timeout + sa.unmask_timeout >= c.round_timeout:
        return "secure_aggregation: the stage timeouts must leave round_timeout time to train"
    return None


def load_aggregator_config(path: Path) -> AggregatorConfig:
    return load_yaml_config(path, AggregatorConfig)
