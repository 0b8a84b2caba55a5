"""``fedge``: the command line. It wires the roles together and is imported by nothing.

Every user-facing error is one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from fedge.support.runtime import exit_user_error
from fedge_cli.simulate import _simulate, _simulate_args
from simulation import DEFAULT_SIM_CODEC

__all__ = ["DEFAULT_SIM_CODEC", "main"]


def _strategies(_args: argparse.Namespace) -> None:
    from aggregator.strategies import describe_strategies

    infos = describe_strategies()
    name_w = max(len(i.name) for i in infos) + 2
    opt_w = max(len(f"{o.key}={o.default!s}") for i in infos for o in i.options) + 2
    for info in infos:
        print(f"{info.name:<{name_w}}{info.summary}")
        for o in info.options:
            print(f"    {f'{o.key}={o.default!s}':<{opt_w}}{o.help}")


def _data_split(args: argparse.Namespace) -> None:
    from fedge.topics import validate_device_id
    from simulation.datasets import make_federated, write_npz_partitions

    ids = None
    if args.device_ids is not None:
        ids = [validate_device_id(d.strip()) for d in args.device_ids.split(",")]
        if len(ids) != args.devices:
            msg = f"--device-ids names {len(ids)} devices, --devices is {args.devices}"
            raise ValueError(msg)
    data = make_federated(args.dataset, args.devices, args.partition, args.seed)
    paths = write_npz_partitions(data, args.out, ids)
    print(f"wrote {len(paths)} files to {args.out} (sizes {list(data.sizes)})")
    if ids is None:
        print("devices claim a file each, first come first served (no --device-ids)")


def _models(_args: argparse.Namespace) -> None:
    from models.zoo import list_models

    for m in list_models():
        print(f"{m.name:10s} {m.description}")


def build_parser() -> argparse.ArgumentParser:
    from aggregator import cli as agg_cli
    from edge_agent import cli as agent_cli

    p = argparse.ArgumentParser(prog="fedge", description="Federated learning over MQTT")
    p.add_argument("--version", action="version", version=f"fedge {_version()}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    sim = sub.add_parser("simulate", help="run a fleet on this machine over a real Mosquitto")
    _simulate_args(sim)
    sim.set_defaults(func=_simulate)
    agg = sub.add_parser("aggregator", help="run the aggregator service")
    agg_cli.add_arguments(agg)
    agg.set_defaults(func=agg_cli.run)
    from aggregator.sharded import service as shard_service

    sw = sub.add_parser(
        "shard-worker", help="run one shard worker of sharded aggregation (docs/scaling.md)"
    )
    shard_service.add_arguments(sw)
    sw.set_defaults(func=shard_service.run)
    from aggregator.gateway import cli as gateway_cli

    gw = sub.add_parser("gateway", help="run a site's gateway aggregator (docs/operations.md)")
    gateway_cli.add_arguments(gw)
    gw.set_defaults(func=gateway_cli.run)
    ag = sub.add_parser("agent", help="run an edge agent, or 'agent predict' for inference")
    agent_cli.add_arguments(ag)
    ag.set_defaults(func=agent_cli.run)
    data = sub.add_parser("data", help="dataset tools")
    dsub = data.add_subparsers(dest="data_cmd", required=True, metavar="{split}")
    split = dsub.add_parser("split", help="write per-device .npz partitions for real agents")
    split.add_argument(
        "--dataset",
        default="digits",
        help="digits, synthetic[:A,B], mnist5k or imu (default: %(default)s)",
    )
    split.add_argument(
        "--devices", type=int, default=10, help="files device-000.npz … (default: %(default)s)"
    )
    split.add_argument(
        "--partition",
        default="dirichlet:0.5",
        help="iid, dirichlet:A, shards:K (default: %(default)s)",
    )
    split.add_argument(
        "--seed", type=int, default=0, help="seed of the split (default: %(default)s)"
    )
    split.add_argument(
        "--out",
        type=Path,
        required=True,
        help="directory to write; device-*.npz of an earlier split there are replaced",
    )
    split.add_argument(
        "--device-ids",
        default=None,
        metavar="ID,ID,…",
        help="one device id per file, in order, written to meta.json: an agent whose data: is "
        "the directory takes its own file (default: devices claim files first come, first served)",
    )
    split.set_defaults(func=_data_split)
    strat = sub.add_parser("strategies", help="list aggregation strategies and their options")
    strat.set_defaults(func=_strategies)
    models = sub.add_parser("models", help="list model architectures")
    models.set_defaults(func=_models)
    from fedge_cli import status

    st = sub.add_parser(
        "status", help="the devices and the open round of a fleet, read from its broker"
    )
    status.add_arguments(st)
    st.set_defaults(func=status.run)
    from fedge_cli import rollout

    ro = sub.add_parser(
        "rollout", help="release a version to the fleet in stages (docs/operations.md)"
    )
    rollout.add_arguments(ro)
    ro.set_defaults(func=rollout.run)
    from fedge_cli import admin  # ca init|crl|broker-config, enroll, revoke

    admin.add_arguments(sub)
    from fedge_cli import report  # matplotlib is imported only when a report is drawn

    rep = sub.add_parser("report", help="plot accuracy vs rounds and vs uplink bytes (PNG)")
    report.add_arguments(rep)
    rep.set_defaults(func=report.run)
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedge")
    except PackageNotFoundError:  # a checkout on PYTHONPATH, never installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> None:
    try:
        _main(argv)
        sys.stdout.flush()  # here, not at exit: a closed pipe is then caught below
    except BrokenPipeError:
        # `fedge strategies | head`: the reader left. No traceback; stdout goes to /dev/null
        # so the interpreter's own flush at exit does not fail again; the status of a
        # command killed by SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(128 + signal.SIGPIPE)


def _main(argv: list[str] | None) -> None:
    from fedge.errors import FedgeError

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["agent"]:
        # A device's command, straight to its own parser: the full parser imports every
        # role's CLI (aggregator, shard worker, CA, reports), ~36 MiB a device never uses
        # (docs/benchmarks.md, device footprint).
        from edge_agent import cli as agent_cli

        agent_cli.main(argv[1:], prog="fedge agent")
        return
    args = build_parser().parse_args(argv)
    # A service names itself, as `fedge agent: error:` does: its line is read in a journal
    # among other units' lines (operations.md, Troubleshooting).
    prog = f"fedge {args.cmd}" if args.cmd in _SERVICES else "fedge"
    try:
        args.func(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except (FedgeError, ValueError, FileNotFoundError) as e:
        exit_user_error(prog, e)
    except RuntimeError as e:  # e.g. mosquitto missing or failing to start
        exit_user_error(prog, e)


_SERVICES = frozenset({"aggregator", "shard-worker", "gateway"})


if __name__ == "__main__":
    main()
