"""``fedge rollout start|status|promote|abort|rollback``: the operator's side of a release.

Commands reach the aggregator as request files in its state directory
(``aggregator.rollout_requests``: who may write there may command, the broker never carries
a command); ``status`` reads ``STATE_DIR/rollout.json`` and needs no running aggregator. The
state directory comes from ``--state-dir`` or from the aggregator's ``--config``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fedge.errors import ConfigError

__all__ = ["add_arguments", "parse_stages", "run"]


def parse_stages(text: str) -> tuple[float, ...]:
    """``0.05,0.25,1`` -> rising fractions in (0, 1] ending at 1."""
    try:
        stages = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--stages {text!r}: write fractions like 0.05,0.25,1") from None
    ok = all(0 < s <= 1 for s in stages) and list(stages) == sorted(set(stages))
    if not stages or not ok or stages[-1] != 1.0 or len(stages) > 16:
        raise ConfigError(f"--stages {text!r}: 1-16 rising fractions in (0, 1], the last 1")
    return stages


def add_arguments(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument("--state-dir", type=Path, help="the aggregator's state_dir")
    where.add_argument("--config", type=Path, help="the aggregator's YAML config")
    p.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for the aggregator (10)"
    )
    sub = p.add_subparsers(dest="rollout_cmd", required=True, metavar="COMMAND")
    st = sub.add_parser("start", help="release VERSION in stages, gated by shadow evaluation")
    st.add_argument("version", type=int, help="a version kept in the aggregator's registry")
    st.add_argument(
        "--canary", type=float, default=None, help="first stage's fraction (default 0.05)"
    )
    st.add_argument(
        "--stages", default=None, help="fractions of the fleet per stage (default 0.05,0.25,1)"
    )
    st.add_argument(
        "--max-regression",
        type=float,
        default=1.0,
        help="accuracy points the canaries may lose, pooled (default: %(default)s)",
    )
    st.add_argument(
        "--min-devices",
        type=int,
        default=1,
        help="reports a stage waits for (fewer if its new cohort is smaller; default 1)",
    )
    sub.add_parser("status", help="the rollout, its stage, the devices' shadow reports")
    sub.add_parser("promote", help="advance the running rollout one stage now")
    sub.add_parser("abort", help="stop the running rollout: back to the previous version")
    rb = sub.add_parser("rollback", help="every device serves VERSION (default: the previous)")
    rb.add_argument("version", type=int, nargs="?", default=None)


def _state_dir(args: argparse.Namespace) -> Path:
    if args.state_dir is not None:
        state_dir = Path(args.state_dir)
    elif args.config is not None:
        from aggregator.config import load_aggregator_config

        state_dir = load_aggregator_config(args.config).state_dir
    else:
        raise ConfigError("fedge rollout needs --state-dir DIR or --config AGGREGATOR.yaml")
    # A mistyped directory would print an empty status, or wait out --timeout for an
    # aggregator that can never take the request.
    if not (state_dir / "models").is_dir():
        raise ConfigError(
            f"{state_dir} is not an aggregator's state_dir (no models/ in it): "
            "give the state_dir of its config, or --config AGGREGATOR.yaml"
        )
    return state_dir


def _start_args(args: argparse.Namespace) -> dict[str, Any]:
    stages = parse_stages(args.stages) if args.stages else (0.05, 0.25, 1.0)
    if args.canary is not None:
        if not 0 < args.canary < 1:
            raise ConfigError(f"--canary {args.canary}: a fraction in (0, 1)")
        stages = tuple(sorted({args.canary, *(s for s in stages if s > args.canary)}))
    if args.max_regression < 0 or args.min_devices < 1:
        raise ConfigError("--max-regression must be >= 0 and --min-devices >= 1")
    return {
        "version": args.version,
        "stages": list(stages),
        "max_regression": args.max_regression,
        "min_devices": args.min_devices,
    }


def run(args: argparse.Namespace) -> None:
    from aggregator.rollout_requests import submit, wait_result

    state_dir = _state_dir(args)
    cmd = args.rollout_cmd
    if cmd == "status":
        from aggregator.rollout_state import RolloutState, status_of

        print(json.dumps(status_of(RolloutState.load(state_dir / "rollout.json")), indent=1))
        return
    body: dict[str, Any] = {}
    if cmd == "start":
        body = _start_args(args)
    elif cmd == "rollback" and args.version is not None:
        body = {"version": args.version}
    answer = wait_result(state_dir, submit(state_dir, cmd, body), args.timeout)
    if not answer.get("ok"):
        raise ConfigError(str(answer.get("message")))
    print(answer.get("message"))
