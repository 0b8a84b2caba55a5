"""``fedge gateway --config gateway.yaml``: the aggregator of one site (docs/operations.md)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fedge.support.runtime import exit_user_error, log_level

__all__ = ["add_arguments", "main", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, required=True, help="see examples/gateway.yaml")
    p.add_argument("--log-level", type=log_level, default="INFO", help="DEBUG … CRITICAL")


def run(args: argparse.Namespace) -> None:
    from aggregator.gateway.settings import load_gateway_config
    from aggregator.gateway.site import SiteGateway
    from fedge.support.runtime import setup_logging, wait_for_signal
    from fedge.transport.mux import Mux

    setup_logging(args.log_level)
    cfg = load_gateway_config(args.config)
    keyring = None
    if cfg.device_keys is not None:
        from aggregator.keyring import KeyRing

        keyring = KeyRing(cfg.device_keys)
    worker_cfg = cfg.worker_config()
    mux = Mux(cfg.name).start()
    gateway = SiteGateway(worker_cfg, mux, keyring=keyring)
    print(f"fedge gateway {cfg.name}: site broker {cfg.broker}, fleet {cfg.fleet}", flush=True)
    gateway.start()
    try:
        wait_for_signal(mux.gave_up)
    finally:
        gateway.stop()
        time.sleep(0.3)
        mux.stop()
    if mux.refused is not None:
        from fedge.errors import IdentityRefused

        raise IdentityRefused(mux.refused)


def main(argv: list[str] | None = None) -> None:
    from fedge.errors import FedgeError

    p = argparse.ArgumentParser(prog="fedge gateway", description="a site's gateway aggregator")
    add_arguments(p)
    try:
        run(p.parse_args(argv))
    except (FedgeError, ValueError) as e:
        exit_user_error("fedge gateway", e)


if __name__ == "__main__":
    main()
