"""``fedge simulate``: a whole fleet on one machine, over a real Mosquitto.

The aggregator and N edge agents run in this process, each agent with its own MQTT
connection. Agents share one selector loop (``Mux``) and one training thread; the aggregator
has a loop of its own so that exporting and evaluating never stalls the agents' keepalives.

Device heterogeneity (stragglers, slow devices) is in ``simulation.heterogeneity``; the
settings in ``simulation.sim_config``, what is started and wired in ``simulation.wiring``, the
summary and its byte accounting in ``simulation.summary``.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aggregator.evaluation import EvalSet
from aggregator.service import Aggregator
from fedge.errors import BrokerUnavailable, ConfigError
from fedge.topics import Topics
from fedge.transport.mux import Mux
from simulation import default_codec
from simulation.datasets import make_federated
from simulation.heterogeneity import (
    DelayedExecutor,
    device_delays,
    straggler_draw,
    straggler_train,
)
from simulation.keys import SimKeys
from simulation.roles import build_agent, start_shard_workers
from simulation.sim_config import SimConfig, _aggregator_config
from simulation.summary import _printer, _summary, _wait_for_final_model
from simulation.wiring import _broker, _fresh_out, _gateway_keys, _Run, _start_agents, _topology

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
