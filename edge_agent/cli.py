"""Command line of the edge agent: ``run`` (train in the fleet) and ``predict`` (inference).

``predict`` uses onnxruntime only: nothing on its path imports torch, so a device that only
runs inference needs neither torch nor the training extras.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedge.support.runtime import exit_user_error, log_level

__all__ = ["add_arguments", "main", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="agent YAML config (see examples/agent.yaml)")
    p.add_argument("--log-level", type=log_level, default="INFO", help="DEBUG … CRITICAL")
    sub = p.add_subparsers(dest="agent_cmd", metavar="{predict}")
    pr = sub.add_parser("predict", help="classify samples with an ONNX model (onnxruntime only)")
    which = pr.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", type=Path, help="ONNX file, e.g. STATE_DIR/model.onnx")
    which.add_argument(
        "--state-dir",
        type=Path,
        help="an agent's state_dir: answer with the version released to it (its serving "
        "version, STATE_DIR/serving/), not the training model",
    )
    pr.add_argument("--input", type=Path, required=True, help=".npy, .npz (key x) or .csv rows")
    pr.add_argument("--json", action="store_true", help="print JSON with logits")


def predict(model: Path | None, inp: Path, as_json: bool, state_dir: Path | None = None) -> None:
    from edge_agent.inference import OnnxPredictor, load_input
    from fedge.errors import ConfigError

    version: int | None = None
    if model is not None:
        if not model.is_file():
            raise ConfigError(f"model file {model} not found")
        onnx = model.read_bytes()
    else:
        from edge_agent.serving_store import load_serving

        assert state_dir is not None
        version, onnx = load_serving(state_dir)
    if not inp.is_file():
        raise ConfigError(f"input file {inp} not found")
    try:
        predictor = OnnxPredictor(onnx)
        x = load_input(inp)
        logits = predictor.predict_logits(x)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    classes = logits.argmax(axis=1)
    if as_json:
        out = {"classes": classes.tolist(), "logits": logits.tolist()}
        print(json.dumps(out if version is None else {"serving": version, **out}))
    else:
        for c in classes:
            print(int(c))


def run_agent(config: Path, log_level: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from edge_agent.agent import EdgeAgent
    from edge_agent.config import load_agent_config
    from edge_agent.data import load_local_data
    from edge_agent.privacy import LocalDP
    from edge_agent.store import AgentStore
    from fedge.errors import ConfigError
    from fedge.identity import load_signing_key, load_verify_key
    from fedge.support.runtime import setup_logging, wait_for_signal
    from fedge.topics import Topics
    from fedge.transport.mqtt import BrokerURL, probe_broker
    from fedge.transport.mux import Mux

    setup_logging(log_level)
    cfg = load_agent_config(config)
    if cfg.models:
        from models.zoo import register_factory

        for ref in cfg.models:
            try:
                register_factory(ref)
            except ValueError as e:
                raise ConfigError(str(e)) from None
    data = load_local_data(cfg.data, cfg.device_id)
    held = AgentStore(cfg.state_dir).load_model()
    problem = held and data.width_problem(held.arch.input_dim)
    if held is not None and problem:
        raise ConfigError(f"{problem} (model v{held.version} in {cfg.state_dir}); fix data:")
    # The wrong port (TLS, not MQTT) would make the session retry silently forever.
    t = cfg.tls
    probe_broker(
        BrokerURL.parse(cfg.broker),
        ca_cert=str(t.ca_cert) if t else None,
        client_cert=_opt(t.client_cert) if t else None,
        client_key=_opt(t.client_key) if t else None,
        # a broker not up yet (boot, restart): the session retries; a wrong one: exit 2
        unreachable_ok=True,
    )
    mux = Mux(f"agent-{cfg.device_id}").start()
    agent = EdgeAgent(
        device_id=cfg.device_id,
        mux=mux,
        broker=BrokerURL.parse(cfg.broker),
        topics=Topics(cfg.fleet),
        data=data,
        store=AgentStore(cfg.state_dir),
        executor=ThreadPoolExecutor(max_workers=1, thread_name_prefix="train"),
        username=cfg.username,
        password=cfg.password,
        keepalive=cfg.keepalive,
        seed=cfg.seed,
        signing_key=load_signing_key(cfg.signing_key) if cfg.signing_key else None,
        aggregator_key=load_verify_key(cfg.aggregator_key) if cfg.aggregator_key else None,
        tls=(
            (str(t.ca_cert), _opt(t.client_cert), _opt(t.client_key))
            if (t := cfg.tls)
            else (None, None, None)
        ),
        local_dp=LocalDP(cfg.local_dp.clip_norm, cfg.local_dp.noise_multiplier)
        if cfg.local_dp
        else None,
        holdout=load_local_data(cfg.holdout, cfg.device_id) if cfg.holdout else None,
    )
    print(
        f"fedge agent {cfg.device_id}: {len(data)} samples, broker {cfg.broker}, "
        f"fleet {cfg.fleet}, state {cfg.state_dir}",
        flush=True,
    )
    agent.start()
    try:
        wait_for_signal(mux.gave_up)
    finally:
        agent.stop()
        import time

        time.sleep(0.3)
        mux.stop()
    if mux.refused is not None:
        from fedge.errors import IdentityRefused

        raise IdentityRefused(mux.refused)


def _opt(p: Path | None) -> str | None:
    return None if p is None else str(p)


def run(args: argparse.Namespace) -> None:
    from fedge.errors import ConfigError

    if args.agent_cmd == "predict":
        predict(args.model, args.input, args.json, args.state_dir)
    elif args.config is None:
        raise ConfigError("fedge agent needs --config FILE (or the 'predict' subcommand)")
    else:
        run_agent(args.config, args.log_level)


def main(argv: list[str] | None = None, prog: str = "python -m edge_agent") -> None:
    from fedge.errors import FedgeError

    p = argparse.ArgumentParser(prog=prog, description="fedge edge agent")
    add_arguments(p)
    try:
        run(p.parse_args(argv))
    except KeyboardInterrupt:
        sys.exit(130)
    except (FedgeError, ValueError, FileNotFoundError, RuntimeError) as e:
        exit_user_error("fedge agent", e)
