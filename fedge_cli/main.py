"""``fedge``: the command line. It wires the roles together and is imported by nothing.

Every user-facing error is one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from fedge.support.runtime import exit_user_error, log_level
from simulation import DEFAULT_DOWNLINK_CODEC, DEFAULT_SIM_CODEC

__all__ = ["DEFAULT_SIM_CODEC", "main"]


def _simulate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="digits", help="digits, synthetic[:A,B], mnist5k or imu")
    p.add_argument("--devices", type=int, default=10)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--partition", default="dirichlet:0.5", help="iid, dirichlet:ALPHA, shards:K")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--broker",
        default=None,
        help="mqtt://HOST:PORT of an existing broker "
        "(default: start a Mosquitto on a free loopback port)",
    )
    p.add_argument("--out", type=Path, default=Path("runs/sim"))
    p.add_argument(
        "--codec",
        default=None,
        help=f"delta codec: [topk:F+](fp32|fp16|int8|int4)[+zstd]; default {DEFAULT_SIM_CODEC} "
        "(about 40x less uplink than fp32 for -0.56 pp on the demo task, docs/benchmarks.md), "
        "int8+zstd for the robust strategies (median, trimmed_mean, krum, multikrum), which "
        "need dense updates",
    )
    p.add_argument(
        "--downlink-codec",
        default=None,
        help=f"how versions reach devices: full (the whole model every version) or a codec for "
        f"signed model patches with server-side error feedback; default {DEFAULT_DOWNLINK_CODEC}",
    )
    p.add_argument(
        "--patch-retain", type=int, default=8, help="patches kept retained for catching up"
    )
    p.add_argument("--model", default=None, help="model name (default: by dataset)")
    p.add_argument("--epochs", type=int, default=5, help="local epochs per round")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.1, help="local SGD learning rate")
    p.add_argument("--round-timeout", type=float, default=60.0, help="seconds per round")
    p.add_argument("--min-devices", type=int, default=None, help="quorum (default: half)")
    p.add_argument("--strategy", default="fedavg", help="see `fedge strategies`")
    p.add_argument(
        "--strategy-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="strategy option (repeatable), e.g. --strategy-opt mu=0.1",
    )
    p.add_argument("--server-lr", type=float, default=None, help="default: the strategy's")
    p.add_argument(
        "--clients-per-round",
        type=int,
        default=None,
        help="devices asked per round (seeded sample); default all",
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="also publish an int8 ONNX calibrated from devices' activation ranges",
    )
    p.add_argument("--qat", action="store_true", help="devices train quantization-aware")
    p.add_argument(
        "--mode",
        choices=("sync", "async"),
        default="sync",
        help="async: FedBuff, a version every --async-buffer updates, no round barrier",
    )
    p.add_argument("--async-buffer", type=int, default=10, help="FedBuff K (async mode)")
    p.add_argument(
        "--stragglers",
        type=float,
        default=0.0,
        help="probability that a device, each round, is a straggler running 1..epochs epochs",
    )
    p.add_argument(
        "--drop-stragglers",
        action="store_true",
        help="stragglers send nothing that round (they missed the deadline)",
    )
    p.add_argument(
        "--device-delay",
        type=_delay_range,
        default=None,
        metavar="LO,HI",
        help="seconds of simulated compute added per device, log-spaced from LO to HI",
    )
    p.add_argument(
        "--shard-workers",
        type=int,
        default=0,
        help="N (<= 4) shard workers fold the updates (MQTT 5 shared subscription); the "
        "aggregator reduces their partial sums (docs/scaling.md)",
    )
    p.add_argument(
        "--sites",
        type=int,
        default=0,
        help="S (<= 8) site Mosquittos bridged to a central one, a gateway per site, devices "
        "spread over the sites; summary.json gains wan_bytes (docs/scaling.md)",
    )
    p.add_argument(
        "--wan",
        action="store_true",
        help="flat: devices reach the broker through a counted WAN link (wan_bytes)",
    )
    p.add_argument(
        "--early-stop-patience",
        type=int,
        default=0,
        help="devices hold out 10 %% of their data and stop local training after this many "
        "epochs without a better held-out loss (0 = off)",
    )
    p.add_argument(
        "--adaptive-server-lr",
        action="store_true",
        help="halve the server learning rate after 3 versions without a better accuracy",
    )
    p.add_argument(
        "--prune",
        default=None,
        metavar="SPEC",
        help="gradual magnitude pruning to a weight sparsity, KIND:TARGET[@START-END][,SCOPE]: "
        "structured:0.5 (whole hidden units) or unstructured:0.75@1-20,global; default off",
    )
    p.add_argument("--no-sign", action="store_true", help="do not sign updates and models")
    p.add_argument(
        "--secagg",
        action="store_true",
        help="secure aggregation: the aggregator sees masked vectors and learns only the sum",
    )
    p.add_argument(
        "--secagg-dropout",
        type=float,
        default=0.0,
        metavar="F",
        help="with --secagg: each round this share of devices vanishes at a random stage",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve Prometheus /metrics and the live dashboard (/) on 127.0.0.1:PORT "
        "(0: any free port; default off)",
    )
    p.add_argument(
        "--broker-config",
        default="local",
        help="broker_config/NAME.conf.template for the started Mosquitto "
        "(local: durable, saves on every change; scale: saves every 60 s)",
    )
    p.add_argument("--log-level", type=log_level, default="WARNING", help="DEBUG … CRITICAL")
    p.add_argument(
        "--init",
        type=Path,
        default=None,
        metavar="ONNX",
        help="warm start: the fleet starts from this ONNX file's weights (model.init)",
    )
    p.add_argument(
        "--trainable",
        default=None,
        metavar="PATTERNS",
        help="fine-tune only the tensors these comma-separated glob patterns name, e.g. "
        "'fc3.*' (model.trainable); devices train and send only those",
    )
    p.add_argument(
        "--rollout",
        default=None,
        metavar="STAGES",
        help="after training, release the final version through these stages (e.g. "
        "0.2,0.5,1) with shadow evaluation on each device's hold-out (20 %% of its data, not "
        "trained on); writes OUT/rollout.json",
    )
    p.add_argument(
        "--rollout-candidate",
        choices=("good", "bad"),
        default="good",
        help="bad: the final weights shuffled, to show the automatic rollback (default good)",
    )
    p.add_argument(
        "--rollout-max-regression",
        type=float,
        default=1.0,
        help="accuracy points the canaries may lose, pooled (default: %(default)s)",
    )
    p.add_argument(
        "--rollout-min-devices",
        type=int,
        default=2,
        help="reports each stage waits for (fewer if its cohort is smaller; default 2)",
    )


def _delay_range(text: str) -> tuple[float, float]:
    lo, sep, hi = text.partition(",")
    try:
        return (float(lo), float(hi if sep else lo))
    except ValueError:
        msg = f"expected LO,HI seconds, e.g. 0.2,2; got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None


def _simulate(args: argparse.Namespace) -> None:

    from fedge.support.runtime import setup_logging
    from fedge.trainable import split_patterns
    from fedge_cli.rollout import parse_stages
    from simulation.fleet import SimConfig, simulate

    setup_logging(args.log_level)
    cfg = SimConfig(
        out=args.out,
        dataset=args.dataset,
        devices=args.devices,
        rounds=args.rounds,
        partition=args.partition,
        seed=args.seed,
        broker=args.broker,
        codec=args.codec,
        downlink_codec=args.downlink_codec or DEFAULT_DOWNLINK_CODEC,
        patch_retain=args.patch_retain,
        model=args.model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        round_timeout=args.round_timeout,
        min_devices=args.min_devices,
        strategy=args.strategy,
        strategy_opts=tuple(_pairs(args.strategy_opt).items()),
        server_lr=args.server_lr,
        clients_per_round=args.clients_per_round,
        int8=args.int8,
        qat=args.qat,
        sign=not args.no_sign,
        stragglers=args.stragglers,
        drop_stragglers=args.drop_stragglers,
        device_delay=args.device_delay,
        broker_config=args.broker_config,
        mode=args.mode,
        async_buffer=args.async_buffer,
        shard_workers=args.shard_workers,
        sites=args.sites,
        wan=args.wan,
        early_stop_patience=args.early_stop_patience,
        adaptive_server_lr=args.adaptive_server_lr,
        metrics_port=args.metrics_port,
        init=args.init,
        trainable=split_patterns(args.trainable),
        rollout=parse_stages(args.rollout) if args.rollout else None,
        rollout_candidate=args.rollout_candidate,
        rollout_max_regression=args.rollout_max_regression,
        rollout_min_devices=args.rollout_min_devices,
        prune=args.prune,
        secagg=args.secagg,
        secagg_dropout=args.secagg_dropout,
    )
    s = simulate(cfg)
    print(
        f"done: {s['rounds']} rounds, final accuracy {s['final_accuracy']:.4f}, "
        f"uplink {s['uplink_bytes']} B, downlink {s['downlink_bytes']} B, "
        f"{s['wall_seconds']:.1f} s (+{s['setup_seconds']:.1f} s set-up)"
    )
    if s.get("wan_bytes") is not None:
        print(f"WAN (bytes across the links, both ways): {s['wan_bytes']} B")
    print(f"summary: {(args.out / 'summary.json').resolve()}")
    print(f"model:   {s['model_onnx']}")


def _pairs(items: list[str]) -> dict[str, str]:
    from aggregator.strategies import parse_option_pairs

    return dict(parse_option_pairs(items))


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
