"""``fedge simulate``: a whole fleet on one machine, over a real Mosquitto.

The aggregator and N edge agents run in this process, each agent with its own MQTT
connection. Agents share one selector loop (``Mux``) and one training thread; the aggregator
has a loop of its own so that exporting and evaluating never stalls the agents' keepalives.

Device heterogeneity (stragglers, slow devices) is in ``simulation.heterogeneity``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aggregator.config import (
    DENSE_CODEC,
    AggregatorConfig,
    HyperConfig,
    ModelConfig,
    PlateauSettings,
)
from aggregator.evaluation import EvalSet
from aggregator.prune_config import PruningConfig
from aggregator.service import Aggregator
from aggregator.sharded.worker import ShardWorker
from edge_agent.agent import EdgeAgent
from edge_agent.model_cache import ModelCache
from fedge.errors import BrokerUnavailable, ConfigError
from fedge.topics import Topics
from fedge.transport.mqtt import BrokerURL, probe_broker
from fedge.transport.mux import Mux
from simulation import default_codec
from simulation.broker import CONFIG_DIR
from simulation.datasets import make_federated
from simulation.heterogeneity import (
    DelayedExecutor,
    device_delays,
    straggler_draw,
    straggler_train,
)
from simulation.keys import SimKeys
from simulation.roles import build_agent, start_shard_workers
from simulation.secagg import check_strategy, secagg_device, secagg_settings, secagg_summary
from simulation.topology import Topology, default_acl, site_names

__all__ = [
    "DelayedExecutor",
    "SimConfig",
    "build_agent",
    "device_delays",
    "simulate",
    "straggler_draw",
    "straggler_train",
]

log = logging.getLogger(__name__)

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


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def simulate(cfg: SimConfig, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the fleet until ``cfg.rounds`` versions are published; return the summary."""
    t_start = time.perf_counter()
    out = _fresh_out(Path(cfg.out))
    try:
        data = make_federated(cfg.dataset, cfg.devices, cfg.partition, cfg.seed, cfg.test_fraction)
    except ValueError as e:
        raise ConfigError(str(e)) from None

    import torch

    torch.set_num_threads(1)  # tiny models: one thread per step is fastest, and leaves a core

    # A fleet name of its own: retained messages of an earlier run on a shared broker
    # must not leak into this one.
    topics = Topics(f"sim-{uuid.uuid4().hex[:8]}")
    topology = _topology(cfg, out)
    broker, url = (None, topology.start(topics.fleet)) if topology else _broker(cfg, out)
    say(
        f"broker {url}  |  {cfg.dataset}: {cfg.devices} devices, partition {cfg.partition}, "
        f"sizes {min(data.sizes)}-{max(data.sizes)}, test {len(data.test[1])}  |  "
        f"{cfg.strategy}, "
        + (
            "secure aggregation"
            if cfg.secagg
            else f"codec {cfg.codec or default_codec(cfg.strategy)}"
        )
    )
    run = _Run(topology=topology)
    try:
        keys = SimKeys.make(out / "keys", cfg.devices) if cfg.sign else None
        agg_cfg = _aggregator_config(cfg, data, url, topics.fleet, keys, out)
        run.agg_mux, run.dev_mux = Mux("aggregator").start(), Mux("devices").start()
        run.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="train")
        run.aggregator = Aggregator(
            agg_cfg, run.agg_mux, eval_set=EvalSet(*data.test), on_round=_printer(cfg, run, say)
        )
        run.aggregator.start()
        if run.aggregator.web is not None:
            web = run.aggregator.web.url
            say(f"dashboard {web}  |  Prometheus {web}metrics")
        run.workers = start_shard_workers(agg_cfg, out, run.agg_mux)
        if topology is not None:
            topology.start_gateways(agg_cfg, run.agg_mux, *_gateway_keys(agg_cfg))
        _start_agents(cfg, data, run, url, topics, out, keys)
        t_fleet = time.perf_counter()
        budget = cfg.rounds * (cfg.round_timeout + 30) + 60
        while not run.aggregator.done.wait(1.0):
            if time.perf_counter() - t_fleet > budget:
                raise BrokerUnavailable(f"simulation made no progress within {budget:.0f} s")
        wall = time.perf_counter() - t_fleet
        _wait_for_final_model(run.agents, run.aggregator.version, timeout=5.0)
        rollout = _rollout(cfg, run, out, say)
    finally:
        run.stop()
        if broker is not None:
            broker.stop()
        if topology is not None:
            topology.stop()
    summary = _summary(cfg, run, out, url, wall=wall, setup=t_fleet - t_start)
    if rollout is not None:
        summary["rollout"] = {"outcome": rollout["outcome"], "file": str(out / "rollout.json")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


@dataclass
class _Run:
    """What a simulation started, so that it can all be stopped whatever failed."""

    agents: list[EdgeAgent] = field(default_factory=list)
    workers: list[ShardWorker] = field(default_factory=list)
    aggregator: Aggregator | None = None
    agg_mux: Mux | None = None
    dev_mux: Mux | None = None
    executor: ThreadPoolExecutor | None = None
    topology: Topology | None = None
    downlink_curve: list[int] = field(default_factory=list)  # bytes down per version

    def stop(self) -> None:
        for a in self.agents:
            a.stop()
        for w in self.workers:
            w.stop()
        if self.topology is not None:
            self.topology.stop_gateways()
        if self.aggregator is not None:
            self.aggregator.stop()
        time.sleep(0.3)
        for mux in (self.dev_mux, self.agg_mux):
            if mux is not None:
                mux.stop()
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)


def _fresh_out(out: Path) -> Path:
    """``out`` without the state of an earlier run (its summary may stay until replaced)."""
    for sub in ("aggregator", "agents", "broker", "shards"):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    return out


def _broker(cfg: SimConfig, out: Path) -> tuple[Any, BrokerURL]:
    """A Mosquitto of our own on a free loopback port, or the ``--broker`` given (probed)."""
    if cfg.broker is not None:
        url = BrokerURL.parse(cfg.broker)
        probe_broker(url)
        return None, url
    from simulation.broker import MosquittoBroker

    template = CONFIG_DIR / f"{cfg.broker_config}.conf.template"
    if not template.is_file():
        raise ConfigError(f"no broker config {template}; see broker_config/")
    # Shard workers need their own ACL sections (aggregator-0..3): acl.sharded.
    acl = CONFIG_DIR / ("acl.sharded" if cfg.shard_workers else "acl")
    broker = MosquittoBroker(out / "broker", template=template, acl=acl).start()
    return broker, BrokerURL.parse(broker.url)


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


def _printer(
    cfg: SimConfig, run: _Run, say: Callable[[str], None]
) -> Callable[[dict[str, Any]], None]:
    """The per-version line on the terminal (downlink counted at the devices)."""
    prev = {"down": 0}

    def on_round(rec: dict[str, Any]) -> None:
        down = sum(a.counters.rx_bytes for a in run.agents)
        run.downlink_curve.append(down - prev["down"])
        say(
            f"round {rec['round']:3d}  v{rec['version']:<3d} | devices {rec['devices']:3d}/"
            f"{cfg.devices} | acc {rec.get('accuracy', float('nan')):.4f} | "
            f"loss {rec.get('loss', float('nan')):.4f} | "
            f"up {_fmt_bytes(rec['uplink_bytes'])} | "
            f"down {_fmt_bytes(down - prev['down'])} | {rec['seconds']:.1f} s"
        )
        prev["down"] = down

    return on_round


def _start_agents(
    cfg: SimConfig,
    data: Any,
    run: _Run,
    url: BrokerURL,
    topics: Topics,
    out: Path,
    keys: SimKeys | None,
) -> None:
    assert run.dev_mux is not None
    assert run.executor is not None
    train_fn = (
        straggler_train(cfg.stragglers, drop=cfg.drop_stragglers) if cfg.stragglers > 0 else None
    )
    delays = device_delays(cfg.device_delay, cfg.devices, cfg.seed)
    model_cache = ModelCache()  # one copy of each version for all simulated devices
    for i, (x, y) in enumerate(data.parts):
        holdout = None
        if cfg.rollout:
            from simulation.rollout_sim import split_holdout

            (x, y), holdout = split_holdout(x, y, cfg.seed * 7919 + i)
        executor: Executor = run.executor
        if delays:
            executor = DelayedExecutor(run.executor, run.dev_mux, delays[i])
        at = run.topology.device_url(i) if run.topology is not None else url
        agent = build_agent(
            i, x, y, mux=run.dev_mux, url=at, topics=topics, out=out, executor=executor,
            seed=cfg.seed, keys=keys, model_cache=model_cache, train_fn=train_fn,
            holdout=holdout,
            secagg=secagg_device(cfg.secagg, cfg.secagg_dropout, cfg.seed, i),
        )  # fmt: skip
        run.agents.append(agent)
        agent.start()


def _summary(
    cfg: SimConfig, run: _Run, out: Path, url: BrokerURL, *, wall: float, setup: float
) -> dict[str, Any]:
    agg = run.aggregator
    assert agg is not None
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ok = [r for r in records if "version" in r]
    last = ok[-1] if ok else {}
    return {
        "rounds": agg.version,
        "failed_rounds": len(records) - len(ok),
        "final_accuracy": last.get("accuracy"),
        "final_loss": last.get("loss"),
        "dp_epsilon": last.get("dp_epsilon"),  # None unless --strategy dp-fedavg
        "uplink_bytes": sum(r["uplink_bytes"] for r in ok),
        "downlink_bytes": sum(a.counters.rx_bytes for a in run.agents),
        **_downlink_split(run.agents),
        "downlink_curve": run.downlink_curve,
        "wall_seconds": round(wall, 3),
        "setup_seconds": round(setup, 3),
        "model_onnx": str(agg.latest_model_path.resolve()),
        # The serving model: structurally pruned units removed (the training model otherwise).
        "model_bytes": int(last.get("serving_bytes", agg.latest_model_path.stat().st_size)),
        "sparsity": last.get("sparsity", 0.0),
        "metrics": str((out / "metrics.jsonl").resolve()),
        "rejected": dict(agg.metrics.rejected),
        "shard_workers": {w.name: w.folded for w in run.workers},  # updates each one folded
        **_wan_summary(run.topology),
        "secagg": secagg_summary(ok) if cfg.secagg else None,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "broker": str(url),
    }


def _topology(cfg: SimConfig, out: Path) -> Topology | None:
    """Sites, or a flat broker behind a counted WAN link; None: the plain broker path."""
    if not cfg.sites and not cfg.wan:
        return None
    if cfg.broker is not None:
        raise ConfigError("--wan needs the simulation's own broker, not --broker")
    template = CONFIG_DIR / f"{cfg.broker_config}.conf.template"
    if not template.is_file():
        raise ConfigError(f"no broker config {template}; see broker_config/")
    acl = default_acl(cfg.shard_workers)
    return Topology(out, template=template, acl=acl, sites=cfg.sites, wan=cfg.wan)


def _gateway_keys(agg: AggregatorConfig) -> tuple[Any, Any]:
    """The device key ring and the aggregator's verify key the gateways check with."""
    from aggregator.keyring import KeyRing
    from fedge.identity import load_signing_key

    keyring = KeyRing(agg.device_keys) if agg.device_keys is not None else None
    agg_key = load_signing_key(agg.signing_key).verify_key if agg.signing_key else None
    return keyring, agg_key


def _wan_summary(topology: Topology | None) -> dict[str, Any]:
    """``wan_bytes``: bytes across the WAN links both ways (None: not measured), the detail,
    and per site gateway the updates it folded."""
    wan = topology.wan() if topology is not None else None
    return {
        "wan_bytes": wan["bytes_up"] + wan["bytes_down"] if wan else None,
        "wan": wan,
        "sites": {g.name: g.folded for g in topology.gateways} if topology else {},
    }


def _rollout(
    cfg: SimConfig, run: _Run, out: Path, say: Callable[[str], None]
) -> dict[str, Any] | None:
    """``--rollout``: the final version released in stages (simulation/rollout_sim.py)."""
    if not cfg.rollout or run.aggregator is None:
        return None
    from simulation.rollout_sim import run_rollout

    return run_rollout(
        run.aggregator, run.agents, out, stages=cfg.rollout, candidate=cfg.rollout_candidate,
        max_regression=cfg.rollout_max_regression, min_devices=cfg.rollout_min_devices,
        seed=cfg.seed, say=say,
    )  # fmt: skip


def _downlink_split(agents: list[EdgeAgent]) -> dict[str, int]:
    """What came down, by kind, counted at the devices (MQTT PUBLISH packets)."""
    c = [a.counters for a in agents]
    return {
        "downlink_patch_bytes": sum(x.rx_patch_bytes for x in c),
        "downlink_model_bytes": sum(x.rx_model_bytes for x in c),
        "downlink_task_bytes": sum(x.rx_task_bytes for x in c),
        "status_bytes": sum(x.tx_status_bytes for x in c),  # devices' statuses, uplink
        "patches_rejected": sum(x.patches_rejected for x in c),
        "resyncs": sum(a.downlink.resyncs for a in agents),
    }


def _wait_for_final_model(agents: list[EdgeAgent], version: int, timeout: float) -> None:
    """Let the last retained model reach the devices, so downlink bytes are complete."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if all(a.model is not None and a.model.version >= version for a in agents):
            return
        time.sleep(0.05)
