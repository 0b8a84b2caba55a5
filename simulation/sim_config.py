"""``fedge simulate``'s settings: ``SimConfig``, checked before anything starts, and the
aggregator's config it becomes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aggregator.config import (
    DENSE_CODEC,
    AggregatorConfig,
    HyperConfig,
    ModelConfig,
    PlateauSettings,
)
from aggregator.prune_config import PruningConfig
from fedge.errors import ConfigError
from fedge.transport.mqtt import BrokerURL
from simulation import default_codec
from simulation.keys import SimKeys
from simulation.secagg import check_strategy, secagg_settings
from simulation.topology import site_names

__all__ = ["SimConfig"]

_MAX_SIM_WORKERS = 4
_MAX_SIM_SITES = 8
_DEFAULT_MODEL = {"digits": "mlp", "mnist5k": "mlp", "synthetic": "logreg", "imu": "cnn1d"}


@dataclass(frozen=True)
class SimConfig:
    out: Path
    dataset: str = "digits"
    devices: int = 10
    rounds: int = 30
    partition: str = "dirichlet:0.5"
    seed: int = 0
    broker: str | None = None
    codec: str | None = None  # None: default_codec(strategy)
    downlink_codec: str = "full"  # or a patch codec (aggregator/downlink.py)
    patch_retain: int = 8
    downlink_feedback: bool = True  # False: the server continues from the devices' weights
    model: str | None = None
    epochs: int = 5
    batch_size: int = 32
    lr: float = 0.1
    round_timeout: float = 60.0
    min_devices: int | None = None
    test_fraction: float = 0.2
    strategy: str = "fedavg"
    strategy_opts: tuple[tuple[str, str], ...] = ()
    server_lr: float | None = None
    clients_per_round: int | None = None
    int8: bool = False
    qat: bool = False
    sign: bool = True  # Ed25519-sign updates and models, as a production fleet does
    # Each round, each training device is a straggler with this probability (seeded per
    # device and round) and runs U{1..epochs} local epochs; see the module docstring.
    stragglers: float = 0.0
    drop_stragglers: bool = False  # a straggler sends nothing that round (missed the deadline)
    # (lo, hi) seconds of simulated compute added to each device's local training, fixed per
    # device and log-spaced over the fleet; None: every device as fast as this machine.
    device_delay: tuple[float, float] | None = None
    broker_config: str = "local"  # broker_config/<name>.conf.template
    mode: str = "sync"  # or "async" (FedBuff)
    async_buffer: int = 10
    shard_workers: int = 0  # > 0: that many shard workers fold the updates, the aggregator reduces
    early_stop_patience: int = 0  # > 0: devices stop on their held-out loss (10 % held out)
    adaptive_server_lr: bool = False  # halve server_lr after 3 versions without a better accuracy
    metrics_port: int | None = None  # serve /metrics and the dashboard here (0: any free port)
    # > 0: S site Mosquittos bridged to a central one, a gateway per site, device i at site
    # i mod S (simulation.topology); the summary gains wan_bytes.
    sites: int = 0
    wan: bool = False  # flat: devices reach the broker through a counted WAN link
    # After training, release the final version through these stages (simulation/rollout_sim.py)
    rollout: tuple[float, ...] | None = None
    rollout_candidate: str = "good"  # or "bad": shuffled weights, to be rolled back
    rollout_max_regression: float = 1.0
    rollout_min_devices: int = 2
    init: Path | None = None  # warm start from this ONNX file (model.init)
    trainable: tuple[str, ...] | None = None  # fine-tune only these tensor patterns
    prune: str | None = None  # --prune SPEC (aggregator/prune_config.py); None: dense
    secagg: bool = False  # secure aggregation: the aggregator sees masked vectors only
    secagg_dropout: float = 0.0  # each round, this share of devices vanishes at a random stage

    def __post_init__(self) -> None:
        from aggregator.config import codec_problem
        from aggregator.strategies import make_strategy
        from fedge.codecs import parse_codec

        # Checked here, before any broker or device starts: later, the aggregator's config
        # would report them as a pydantic block after the broker is up.
        if self.codec is not None:
            parse_codec(self.codec)
        if self.downlink_codec.strip().lower() != "full":
            parse_codec(self.downlink_codec)
        make_strategy(self.strategy, dict(self.strategy_opts), server_lr=self.server_lr)
        problem = self.codec and codec_problem(self.strategy, self.codec)
        if problem:
            raise ConfigError(f"--codec {self.codec} with --strategy {self.strategy}: {problem}")
        if self.secagg:
            check_strategy(self.strategy)
        if self.secagg_dropout and not self.secagg:
            raise ConfigError("--secagg-dropout needs --secagg")
        if not 0.0 <= self.secagg_dropout < 1.0:
            raise ConfigError(f"--secagg-dropout must be in [0, 1), got {self.secagg_dropout}")
        if self.devices < 1:
            raise ConfigError(f"--devices must be >= 1, got {self.devices}")
        if self.rounds < 1:
            raise ConfigError(f"--rounds must be >= 1, got {self.rounds}")
        if not 0.0 <= self.stragglers <= 1.0:
            raise ConfigError(f"--stragglers is a probability in [0, 1], got {self.stragglers}")
        if not 0 <= self.shard_workers <= _MAX_SIM_WORKERS:
            raise ConfigError(
                f"--shard-workers must be in [0, {_MAX_SIM_WORKERS}] (broker_config/acl.sharded "
                f"has sections for aggregator-0..{_MAX_SIM_WORKERS - 1}), got {self.shard_workers}"
            )
        if not 0 <= self.sites <= _MAX_SIM_SITES:
            raise ConfigError(f"--sites must be in [0, {_MAX_SIM_SITES}], got {self.sites}")
        if self.sites and (self.shard_workers or self.broker or self.mode != "sync"):
            raise ConfigError(
                "--sites runs its own brokers and gateways, in sync mode: not "
                "with --shard-workers, --broker or --mode async"
            )
        if self.rollout_candidate not in ("good", "bad"):
            raise ConfigError(f"--rollout-candidate is good or bad, got {self.rollout_candidate}")
        if self.prune is not None:
            PruningConfig.parse(self.prune, self.rounds)
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"--metrics-port must be in [0, 65535], got {self.metrics_port}")
        if self.device_delay is not None:
            lo, hi = self.device_delay
            if not 0.0 <= lo <= hi:
                raise ConfigError(
                    f"--device-delay LO,HI needs 0 <= LO <= HI seconds, got {lo},{hi}"
                )


def _aggregator_config(
    cfg: SimConfig, data: Any, url: BrokerURL, fleet: str, keys: SimKeys | None, out: Path
) -> AggregatorConfig:
    devices = cfg.clients_per_round or cfg.devices
    return AggregatorConfig(
        broker=str(url),
        fleet=fleet,
        state_dir=out / "aggregator",
        metrics_file=out / "metrics.jsonl",
        model=ModelConfig(
            name=cfg.model or _DEFAULT_MODEL.get(data.name.split(":")[0], "mlp"),
            input_dim=data.input_dim,
            num_classes=data.num_classes,
            seed=cfg.seed,
            init=cfg.init,
            trainable=list(cfg.trainable) if cfg.trainable else None,
        ),
        hyper=HyperConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr),
        codec=cfg.codec or (DENSE_CODEC if cfg.secagg else default_codec(cfg.strategy)),
        downlink_codec=cfg.downlink_codec,
        patch_retain=cfg.patch_retain,
        downlink_feedback=cfg.downlink_feedback,
        strategy=cfg.strategy,
        strategy_opts=dict(cfg.strategy_opts),
        server_lr=cfg.server_lr,
        clients_per_round=cfg.clients_per_round,
        int8=cfg.int8,
        qat=cfg.qat,
        mode=cfg.mode,  # type: ignore[arg-type]
        async_buffer=cfg.async_buffer,
        rounds=cfg.rounds,
        target_devices=devices,
        min_devices=cfg.min_devices or max(1, devices // 2),
        round_timeout=cfg.round_timeout,
        device_keys=keys.registry if keys else None,
        signing_key=keys.aggregator_key if keys else None,
        shard_workers=tuple(f"aggregator-{k}" for k in range(cfg.shard_workers))
        or tuple(f"gw-{s}" for s in site_names(cfg.sites)),
        # Sites: a gateway cut off this long past the deadline is left out of the round.
        shard_leave_after=5.0 if cfg.sites else 0.0,
        early_stop_patience=cfg.early_stop_patience,
        adaptive_server_lr=PlateauSettings() if cfg.adaptive_server_lr else None,
        metrics_port=cfg.metrics_port,
        pruning=PruningConfig.parse(cfg.prune, cfg.rounds) if cfg.prune else None,
        **secagg_settings(cfg.secagg, devices),
    )
