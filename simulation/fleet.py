"""``fedge simulate``: a whole fleet on one machine, over a real Mosquitto.

The aggregator and N edge agents run in this process, each agent with its own MQTT
connection. Agents share one selector loop (``Mux``) and one training thread; the aggregator
has a loop of its own so that exporting and evaluating never stalls the agents' keepalives.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.config import AggregatorConfig, HyperConfig, ModelConfig
from aggregator.evaluation import EvalSet
from aggregator.service import Aggregator
from edge_agent.agent import EdgeAgent
from edge_agent.data import LocalData
from edge_agent.model_cache import ModelCache
from edge_agent.store import AgentStore
from fedge.errors import BrokerUnavailable, ConfigError
from fedge.mqtt import BrokerURL, probe_broker
from fedge.mux import Mux
from fedge.topics import Topics
from simulation.datasets import make_federated
from simulation.keys import SimKeys

__all__ = ["SimConfig", "simulate"]

log = logging.getLogger(__name__)

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
    codec: str = "topk:0.03+int4+zstd"  # see fedge_cli.main.DEFAULT_SIM_CODEC
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
    stragglers: float = 0.0  # fraction of devices that run 1..epochs local epochs, seeded
    broker_config: str = "local"  # broker_config/<name>.conf.template
    mode: str = "sync"  # or "async" (FedBuff)
    async_buffer: int = 10

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ConfigError(f"--devices must be >= 1, got {self.devices}")
        if self.rounds < 1:
            raise ConfigError(f"--rounds must be >= 1, got {self.rounds}")


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
    for sub in ("aggregator", "agents", "broker"):
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
        broker = MosquittoBroker(out / "broker", template=template).start()
        url = BrokerURL.parse(broker.url)
    else:
        url = BrokerURL.parse(cfg.broker)
        probe_broker(url)
    say(
        f"broker {url}  |  {cfg.dataset}: {cfg.devices} devices, partition {cfg.partition}, "
        f"sizes {min(data.sizes)}-{max(data.sizes)}, test {len(data.test[1])}"
    )

    agents: list[EdgeAgent] = []
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
            codec=cfg.codec,
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

        rng = np.random.default_rng(cfg.seed + 104729)
        n_slow = round(cfg.stragglers * cfg.devices)
        stragglers = (
            set(rng.choice(cfg.devices, size=n_slow, replace=False).tolist()) if n_slow else set()
        )
        agg_mux, dev_mux = Mux("aggregator").start(), Mux("devices").start()
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="train")
        model_cache = ModelCache()  # one copy of each version for all simulated devices
        aggregator = Aggregator(agg_cfg, agg_mux, eval_set=EvalSet(*data.test), on_round=on_round)
        aggregator.start()
        for i, (x, y) in enumerate(data.parts):
            dev = f"dev-{i:04d}"
            agent = EdgeAgent(
                device_id=dev,
                mux=dev_mux,
                broker=url,
                topics=topics,
                data=LocalData(x, y),
                store=AgentStore(out / "agents" / dev),
                executor=executor,
                seed=cfg.seed * 7919 + i,
                train_fn=straggler_train(cfg.seed * 7919 + i) if i in stragglers else None,
                signing_key=keys.device_keys[i] if keys else None,
                aggregator_key=keys.aggregator_key_pub if keys else None,
                model_cache=model_cache,
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
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "broker": str(url),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def straggler_train(seed: int) -> Callable[..., Any]:
    """Local training that, like a slow device, stops after 1..epochs epochs (FedProx's
    straggler model): the number is drawn per round from the device's seed."""
    from dataclasses import replace

    from edge_agent.trainer import train_local

    rng = np.random.default_rng(seed)

    def train(arch: Any, weights: Any, x: Any, y: Any, hyper: Any, s: int, **kw: Any) -> Any:
        epochs = int(rng.integers(1, hyper.epochs + 1))
        return train_local(arch, weights, x, y, replace(hyper, epochs=epochs), s, **kw)

    return train


def _wait_for_final_model(agents: list[EdgeAgent], version: int, timeout: float) -> None:
    """Let the last retained model reach the devices, so downlink bytes are complete."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if all(a.model is not None and a.model.version >= version for a in agents):
            return
        time.sleep(0.05)
