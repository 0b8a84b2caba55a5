"""``fedge simulate``: its arguments, and the run they configure (``simulation.fleet``).

Part of the command line (``fedge_cli.main`` adds the subcommand); the simulation is
imported only when the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedge.support.runtime import log_level
from simulation import DEFAULT_DOWNLINK_CODEC, DEFAULT_SIM_CODEC

__all__: list[str] = []


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
