"""The roles a simulation starts in its own process: each device's agent (its own MQTT
session on the shared devices' loop, its store under the output directory) and the shard
workers the aggregator's config names. ``bench/scale`` builds agents the same way while it runs
the aggregator as a process of its own."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.config import AggregatorConfig
from aggregator.sharded.worker import ShardWorker
from edge_agent.agent import EdgeAgent
from edge_agent.data import LocalData
from edge_agent.model_cache import ModelCache
from edge_agent.secagg import SecAggOptions
from edge_agent.store import AgentStore
from fedge.topics import Topics
from fedge.transport.mqtt import BrokerURL
from fedge.transport.mux import Mux
from simulation.keys import SimKeys

__all__ = ["build_agent", "start_shard_workers"]


def start_shard_workers(agg: AggregatorConfig, out: Path, mux: Mux) -> list[ShardWorker]:
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
    holdout: tuple[np.ndarray, np.ndarray] | None = None,
    secagg: SecAggOptions | None = None,
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
        holdout=LocalData(*holdout) if holdout is not None else None,
        secagg=secagg,
    )
