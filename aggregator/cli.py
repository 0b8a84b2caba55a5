"""Command line of the aggregator service: ``fedge aggregator --config aggregator.yaml``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedge.support.runtime import exit_user_error, log_level

__all__ = ["add_arguments", "main", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, required=True, help="see examples/aggregator.yaml")
    p.add_argument("--log-level", type=log_level, default="INFO", help="DEBUG … CRITICAL")


def run(args: argparse.Namespace) -> None:
    from aggregator.config import load_aggregator_config
    from aggregator.service import Aggregator
    from fedge.support.runtime import setup_logging, wait_for_signal
    from fedge.transport.mqtt import BrokerURL, probe_broker
    from fedge.transport.mux import Mux

    setup_logging(args.log_level)
    cfg = load_aggregator_config(args.config)
    mux = Mux("aggregator").start()
    agg = Aggregator(cfg, mux, on_round=lambda r: print(_line(r), flush=True))
    # After the config's own errors: a wrong port (TLS, not MQTT) would make the session
    # retry silently forever.
    t = cfg.tls
    probe_broker(
        BrokerURL.parse(cfg.broker),
        ca_cert=str(t.ca_cert) if t else None,
        client_cert=str(t.client_cert) if t and t.client_cert else None,
        client_key=str(t.client_key) if t and t.client_key else None,
        # a broker not up yet (boot, restart): the session retries; a wrong one: exit 2
        unreachable_ok=True,
    )
    print(
        f"fedge aggregator: broker {cfg.broker}, fleet {cfg.fleet}, state {cfg.state_dir}",
        flush=True,
    )
    agg.start()
    if agg.web is not None:
        print(f"dashboard {agg.web.url}, Prometheus {agg.web.url}metrics", flush=True)
    try:
        wait_for_signal(agg.done, mux.gave_up)
    finally:
        agg.stop()
        import time

        time.sleep(0.3)
        mux.stop()
    if mux.refused is not None:
        from fedge.errors import IdentityRefused

        raise IdentityRefused(mux.refused)
    if agg.done.is_set():
        print(f"done: version {agg.version} at {agg.latest_model_path}")


def _line(r: dict[str, Any]) -> str:
    acc = r.get("accuracy")
    acc_s = f" acc {acc:.4f}" if isinstance(acc, float) else ""
    return (
        f"round {r['round']} -> v{r['version']}: {r['devices']} devices,{acc_s} "
        f"up {r['uplink_bytes']} B, {float(r['seconds']):.1f} s"
        + (" (resumed)" if r.get("resumed") else "")
    )


def main(argv: list[str] | None = None) -> None:
    from fedge.errors import FedgeError

    p = argparse.ArgumentParser(prog="python -m aggregator", description="fedge aggregator")
    add_arguments(p)
    try:
        run(p.parse_args(argv))
    except FedgeError as e:
        exit_user_error("fedge aggregator", e)
