"""``fedge simulate``: a whole fleet on one machine, over a real Mosquitto.

The aggregator and N edge agents run in this process, each agent with its own MQTT
connection. Agents share one selector loop (``Mux``) and one training thread; the aggregator
has a loop of its own so that exporting and evaluating never stalls the agents' keepalives.

Two kinds of device heterogeneity can be simulated:

- **Stragglers** (``stragglers=p``), the systems-heterogeneity model of FedProx (Li et al.,
  MLSys 2020, section 5.1): in every round, each device that trains is a straggler with
  probability ``p``, drawn from the per-round seed the agent hands its train function
  (``device seed * 1_000_003 + round``), so a run is reproducible and the draws of different
  devices and rounds are independent. A straggler runs ``U{1..E}`` local epochs instead of E.
  With ``drop_stragglers=True`` it sends nothing instead (it missed the deadline: FedAvg in
  the paper drops such devices), so a sync round counts only the devices that made it.
- **Slow devices** (``device_delay=(lo, hi)``): device i gets a fixed extra compute time,
  log-spaced from ``lo`` to ``hi`` seconds over the fleet and assigned to devices by a seeded
  permutation; its training result is held back that long after its training finishes. The
  wait is a timer on the devices' mux, not a sleeping thread, so slow devices never hold up
  the training thread that fast ones share.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable
from concurrent.futures import CancelledError, Executor, Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.config import AggregatorConfig, HyperConfig, ModelConfig, PlateauSettings
from aggregator.evaluation import EvalSet
from aggregator.service import Aggregator
from aggregator.sharded.worker import ShardWorker
from edge_agent.agent import EdgeAgent
from edge_agent.data import LocalData
from edge_agent.model_cache import ModelCache
from edge_agent.store import AgentStore
from fedge.errors import BrokerUnavailable, ConfigError
from fedge.topics import Topics
from fedge.transport.mqtt import BrokerURL, probe_broker
from fedge.transport.mux import Mux
from simulation import default_codec
from simulation.datasets import make_federated
from simulation.keys import SimKeys

__all__ = ["SimConfig", "build_agent", "simulate"]

log = logging.getLogger(__name__)

_MAX_SIM_WORKERS = 4
_DEFAULT_MODEL = {"digits": "mlp", "mnist5k": "mlp", "synthetic": "logreg"}


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

    def __post_init__(self) -> None:
        from aggregator.config import codec_problem
        from aggregator.strategies import make_strategy
        from fedge.codecs import parse_codec

        # Checked here, before any broker or device starts: later, the aggregator's config
        # would report them as a pydantic block after the broker is up.
        if self.codec is not None:
            parse_codec(self.codec)
        make_strategy(self.strategy, dict(self.strategy_opts), server_lr=self.server_lr)
        problem = self.codec and codec_problem(self.strategy, self.codec)
        if problem:
            raise ConfigError(f"--codec {self.codec} with --strategy {self.strategy}: {problem}")
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
    out = Path(cfg.out)
    for sub in ("aggregator", "agents", "broker", "shards"):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    try:
        data = make_federated(cfg.dataset, cfg.devices, cfg.partition, cfg.seed, cfg.test_fraction)
    except ValueError as e:
        raise ConfigError(str(e)) from None

    import torch

    torch.set_num_threads(1)  # tiny models: one thread per step is fastest, and leaves a core

    broker = None
    if cfg.broker is None:
        from simulation.broker import CONFIG_DIR, MosquittoBroker

        template = CONFIG_DIR / f"{cfg.broker_config}.conf.template"
        if not template.is_file():
            raise ConfigError(f"no broker config {template}; see broker_config/")
        # Shard workers need their own ACL sections (aggregator-0..3): acl.sharded.
        acl = CONFIG_DIR / ("acl.sharded" if cfg.shard_workers else "acl")
        broker = MosquittoBroker(out / "broker", template=template, acl=acl).start()
        url = BrokerURL.parse(broker.url)
    else:
        url = BrokerURL.parse(cfg.broker)
        probe_broker(url)
    say(
        f"broker {url}  |  {cfg.dataset}: {cfg.devices} devices, partition {cfg.partition}, "
        f"sizes {min(data.sizes)}-{max(data.sizes)}, test {len(data.test[1])}  |  "
        f"{cfg.strategy}, codec {cfg.codec or default_codec(cfg.strategy)}"
    )

    agents: list[EdgeAgent] = []
    workers: list[ShardWorker] = []
    aggregator: Aggregator | None = None
    agg_mux = dev_mux = None
    executor: ThreadPoolExecutor | None = None
    try:
        # A fleet name of its own: retained messages of an earlier run on a shared broker
        # must not leak into this one.
        topics = Topics(f"sim-{uuid.uuid4().hex[:8]}")
        keys = SimKeys.make(out / "keys", cfg.devices) if cfg.sign else None
        agg_cfg = AggregatorConfig(
            broker=str(url),
            fleet=topics.fleet,
            state_dir=out / "aggregator",
            metrics_file=out / "metrics.jsonl",
            model=ModelConfig(
                name=cfg.model or _DEFAULT_MODEL.get(data.name.split(":")[0], "mlp"),
                input_dim=data.input_dim,
                num_classes=data.num_classes,
                seed=cfg.seed,
            ),
            hyper=HyperConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr),
            codec=cfg.codec or default_codec(cfg.strategy),
            strategy=cfg.strategy,
            strategy_opts=dict(cfg.strategy_opts),
            server_lr=cfg.server_lr,
            clients_per_round=cfg.clients_per_round,
            int8=cfg.int8,
            qat=cfg.qat,
            mode=cfg.mode,  # type: ignore[arg-type]
            async_buffer=cfg.async_buffer,
            rounds=cfg.rounds,
            target_devices=cfg.clients_per_round or cfg.devices,
            min_devices=cfg.min_devices or max(1, (cfg.clients_per_round or cfg.devices) // 2),
            round_timeout=cfg.round_timeout,
            device_keys=keys.registry if keys else None,
            signing_key=keys.aggregator_key if keys else None,
            shard_workers=tuple(f"aggregator-{k}" for k in range(cfg.shard_workers)),
            early_stop_patience=cfg.early_stop_patience,
            adaptive_server_lr=PlateauSettings() if cfg.adaptive_server_lr else None,
            metrics_port=cfg.metrics_port,
        )
        prev = {"down": 0}

        def on_round(rec: dict[str, Any]) -> None:
            down = sum(a.counters.rx_bytes for a in agents)
            say(
                f"round {rec['round']:3d}  v{rec['version']:<3d} | devices {rec['devices']:3d}/"
                f"{cfg.devices} | acc {rec.get('accuracy', float('nan')):.4f} | "
                f"loss {rec.get('loss', float('nan')):.4f} | "
                f"up {_fmt_bytes(rec['uplink_bytes'])} | "
                f"down {_fmt_bytes(down - prev['down'])} | {rec['seconds']:.1f} s"
            )
            prev["down"] = down

        train_fn = (
            straggler_train(cfg.stragglers, drop=cfg.drop_stragglers)
            if cfg.stragglers > 0
            else None
        )
        delays = device_delays(cfg.device_delay, cfg.devices, cfg.seed)
        agg_mux, dev_mux = Mux("aggregator").start(), Mux("devices").start()
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="train")
        model_cache = ModelCache()  # one copy of each version for all simulated devices
        aggregator = Aggregator(agg_cfg, agg_mux, eval_set=EvalSet(*data.test), on_round=on_round)
        aggregator.start()
        if aggregator.web is not None:
            say(f"dashboard {aggregator.web.url}  |  Prometheus {aggregator.web.url}metrics")
        workers = _start_shard_workers(agg_cfg, out, agg_mux)
        for i, (x, y) in enumerate(data.parts):
            agent = build_agent(
                i,
                x,
                y,
                mux=dev_mux,
                url=url,
                topics=topics,
                out=out,
                executor=DelayedExecutor(executor, dev_mux, delays[i]) if delays else executor,
                seed=cfg.seed,
                keys=keys,
                model_cache=model_cache,
                train_fn=train_fn,
            )
            agents.append(agent)
            agent.start()
        t_fleet = time.perf_counter()
        budget = cfg.rounds * (cfg.round_timeout + 30) + 60
        while not aggregator.done.wait(1.0):
            if time.perf_counter() - t_fleet > budget:
                raise BrokerUnavailable(f"simulation made no progress within {budget:.0f} s")
        wall = time.perf_counter() - t_fleet
        _wait_for_final_model(agents, aggregator.version, timeout=5.0)
    finally:
        for a in agents:
            a.stop()
        for w in workers:
            w.stop()
        if aggregator is not None:
            aggregator.stop()
        time.sleep(0.3)
        for mux in (dev_mux, agg_mux):
            if mux is not None:
                mux.stop()
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        if broker is not None:
            broker.stop()

    assert aggregator is not None
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ok = [r for r in records if "version" in r]
    last = ok[-1] if ok else {}
    summary = {
        "rounds": aggregator.version,
        "failed_rounds": len(records) - len(ok),
        "final_accuracy": last.get("accuracy"),
        "final_loss": last.get("loss"),
        "dp_epsilon": last.get("dp_epsilon"),  # None unless --strategy dp-fedavg
        "uplink_bytes": sum(r["uplink_bytes"] for r in ok),
        "downlink_bytes": sum(a.counters.rx_bytes for a in agents),
        "wall_seconds": round(wall, 3),
        "setup_seconds": round(t_fleet - t_start, 3),
        "model_onnx": str(aggregator.latest_model_path.resolve()),
        "metrics": str((out / "metrics.jsonl").resolve()),
        "rejected": dict(aggregator.metrics.rejected),
        "shard_workers": {w.name: w.folded for w in workers},  # updates each one folded
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "broker": str(url),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _start_shard_workers(agg: AggregatorConfig, out: Path, mux: Mux) -> list[ShardWorker]:
    """The shard workers ``agg.shard_workers`` names, each with its own session and journal,
    enforcing what the aggregator does (signatures, norm bound, sample clamp)."""
    from aggregator.keyring import KeyRing
    from aggregator.sharded.worker import WorkerConfig
    from fedge.identity import load_signing_key

    # Workers verify tasks with the aggregator's key when it signs (fedge.task_check).
    agg_key = load_signing_key(agg.signing_key).verify_key if agg.signing_key else None

    keyring = KeyRing(agg.device_keys) if agg.device_keys is not None else None
    clip = float(agg.strategy_opts.get("clip_norm", 0.0))
    workers = []
    for name in agg.shard_workers:
        cfg = WorkerConfig(
            agg.broker,
            agg.fleet,
            name,
            out / "shards" / name,
            clip_norm=clip,
            max_num_samples=agg.max_num_samples,
            max_sample_ratio=agg.max_sample_ratio,
            aggregator_key=agg_key,
        )
        w = ShardWorker(cfg, mux, keyring=keyring)
        w.start()
        workers.append(w)
    return workers


def build_agent(
    i: int,
    x: np.ndarray,
    y: np.ndarray,
    *,
    mux: Mux,
    url: BrokerURL,
    topics: Topics,
    out: Path,
    executor: Executor,
    seed: int,
    keys: SimKeys | None,
    model_cache: ModelCache,
    train_fn: Callable[..., Any] | None = None,
) -> EdgeAgent:
    """Simulated device ``dev-{i:04d}``: its own MQTT session on ``mux``, its store under
    ``out/agents``. Also used by ``bench/scale/run.py``, which runs the aggregator apart."""
    dev = f"dev-{i:04d}"
    return EdgeAgent(
        device_id=dev,
        mux=mux,
        broker=url,
        topics=topics,
        data=LocalData(x, y),
        store=AgentStore(out / "agents" / dev),
        executor=executor,
        seed=seed * 7919 + i,
        train_fn=train_fn,
        signing_key=keys.device_keys[i] if keys else None,
        aggregator_key=keys.aggregator_key_pub if keys else None,
        model_cache=model_cache,
    )


def straggler_draw(p: float, round_seed: int, epochs: int) -> int | None:
    """The local epochs of a device in a round: None if it is not a straggler (probability
    ``1 - p``), else ``U{1..epochs}``. Pure in ``round_seed`` (the agent's ``device seed *
    1_000_003 + round``), so a benchmark can recount afterwards which devices straggled."""
    rng = np.random.default_rng([round_seed % 2**63, 104729])
    if rng.random() >= p:
        return None
    return int(rng.integers(1, epochs + 1))


def straggler_train(p: float, *, drop: bool = False) -> Callable[..., Any]:
    """A train function for FedProx's straggler model (see :func:`straggler_draw`). With
    ``drop``, a straggler does no work and returns None: the agent then sends nothing."""
    from dataclasses import replace

    from edge_agent.trainer import train_local

    def train(arch: Any, weights: Any, x: Any, y: Any, hyper: Any, s: int, **kw: Any) -> Any:
        epochs = straggler_draw(p, s, hyper.epochs)
        if epochs is None:
            return train_local(arch, weights, x, y, hyper, s, **kw)
        if drop:
            return None
        return train_local(arch, weights, x, y, replace(hyper, epochs=epochs), s, **kw)

    return train


def device_delays(spread: tuple[float, float] | None, devices: int, seed: int) -> list[float]:
    """Per-device extra compute seconds: ``devices`` values log-spaced over ``spread``
    (exactly ``hi / lo`` between the fastest and the slowest device), shuffled by ``seed``."""
    if spread is None:
        return []
    lo, hi = spread
    if devices == 1 or lo == hi:
        grid = np.full(devices, float(lo))
    elif lo == 0:
        grid = np.linspace(0.0, hi, devices)
    else:
        grid = np.geomspace(lo, hi, devices)
    return [float(d) for d in np.random.default_rng([seed, 15485863]).permutation(grid)]


class DelayedExecutor(Executor):
    """Run on ``inner`` (the shared training thread), then hold the result ``delay`` seconds
    on ``mux``'s timers before completing the returned future: a device that computes slower
    than this machine, without a thread asleep that the other devices would queue behind."""

    def __init__(self, inner: Executor, mux: Mux, delay: float) -> None:
        self.inner, self.mux, self.delay = inner, mux, delay

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        outer: Future[Any] = Future()
        outer.set_running_or_notify_cancel()

        def complete(f: Future[Any]) -> None:
            exc = CancelledError() if f.cancelled() else f.exception()
            if exc is not None:
                outer.set_exception(exc)
            else:
                outer.set_result(f.result())

        def trained(f: Future[Any]) -> None:
            # mux.call_later is for the mux thread: hop there first.
            self.mux.call_soon(lambda: self.mux.call_later(self.delay, lambda: complete(f)))

        self.inner.submit(fn, *args, **kwargs).add_done_callback(trained)
        return outer


def _wait_for_final_model(agents: list[EdgeAgent], version: int, timeout: float) -> None:
    """Let the last retained model reach the devices, so downlink bytes are complete."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if all(a.model is not None and a.model.version >= version for a in agents):
            return
        time.sleep(0.05)
