"""Several edge agents in one OS process, as a gateway would run them.

    python -m tests.faults.agent_host AGENT.yaml [AGENT.yaml ...] [--log-level INFO]

Each agent has its own MQTT connection, state directory and data, as with ``python -m
edge_agent``; they share one ``Mux`` and one training thread (torch on one thread), like
``fedge simulate``. A SIGKILL of this process is a power cut of all of them at once. The soak
uses it to run a dozen devices without a dozen copies of torch on a 2-core machine.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.faults.agent_host")
    p.add_argument("configs", nargs="+", type=Path)
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)

    import torch

    from edge_agent.agent import EdgeAgent
    from edge_agent.config import load_agent_config
    from edge_agent.data import load_local_data
    from edge_agent.store import AgentStore
    from fedge.support.runtime import setup_logging, wait_for_signal
    from fedge.topics import Topics
    from fedge.transport.mqtt import BrokerURL
    from fedge.transport.mux import Mux

    setup_logging(args.log_level)
    torch.set_num_threads(1)
    mux = Mux("agent-host").start()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="train")
    agents = []
    for path in args.configs:
        cfg = load_agent_config(path)
        agents.append(
            EdgeAgent(
                device_id=cfg.device_id,
                mux=mux,
                broker=BrokerURL.parse(cfg.broker),
                topics=Topics(cfg.fleet),
                data=load_local_data(cfg.data, cfg.device_id),
                store=AgentStore(cfg.state_dir),
                executor=executor,
                keepalive=cfg.keepalive,
                seed=cfg.seed,
            )
        )
    print(f"agent host: {', '.join(a.device_id for a in agents)}", flush=True)
    for a in agents:
        a.start()
    try:
        wait_for_signal()
    finally:
        for a in agents:
            a.stop()
        time.sleep(0.3)
        mux.stop()
        executor.shutdown(cancel_futures=True)


if __name__ == "__main__":
    main()
