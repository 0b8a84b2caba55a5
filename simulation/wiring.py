"""What ``fedge simulate`` starts and how it is wired: the broker or topology (sites, a WAN
link), the gateways' keys, the agents on their loop and executor, and ``_Run`` that stops it all.
"""

from __future__ import annotations

import shutil
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aggregator.config import AggregatorConfig
from aggregator.service import Aggregator
from aggregator.sharded.worker import ShardWorker
from edge_agent.agent import EdgeAgent
from edge_agent.model_cache import ModelCache
from fedge.errors import ConfigError
from fedge.topics import Topics
from fedge.transport.mqtt import BrokerURL, probe_broker
from fedge.transport.mux import Mux
from simulation.broker import CONFIG_DIR
from simulation.heterogeneity import DelayedExecutor, device_delays, straggler_train
from simulation.keys import SimKeys
from simulation.roles import build_agent
from simulation.secagg import secagg_device
from simulation.sim_config import SimConfig
from simulation.topology import Topology, default_acl

__all__: list[str] = []


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
