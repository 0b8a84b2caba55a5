"""Uplink compression: the same fleet with each delta codec, as ratios against fp32 (issue 3).

Every run is ``simulation.fleet.simulate`` with a Mosquitto of its own on loopback: the
aggregator and every device speak real MQTT, and uplink bytes are the MQTT PUBLISH packets of
the updates as the aggregator received them (envelope and packet header included). For each
seed, every codec runs on the same data split and initial model as ``fp32``; ratios are taken
per seed against that fp32 run, then averaged over seeds.

    .venv/bin/python bench/compression/run.py [--dataset digits|synthetic|mnist5k]
        [--seeds 0,1,2] [--rounds 30] [--codecs fp32,int8+zstd,...] [--out DIR]

Defaults per dataset: digits 10 devices Dirichlet(0.5) MLP; synthetic (FedProx
Synthetic(1,1)) 10 devices logreg; mnist5k 20 devices, 2 label shards each, MLP.
Writes ``OUT/results.json`` (every run and the aggregates) and ``OUT/results.md`` (the table
for docs/benchmarks.md, with the command that made it).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from simulation.fleet import SimConfig, simulate  # noqa: E402

BASELINE = "fp32"
CODECS = [
    "fp32",
    "fp16+zstd",
    "int8+zstd",
    "int4+zstd",
    "topk:0.1+int8+zstd",
    "topk:0.05+int8+zstd",
    "topk:0.01+int8+zstd",
    "topk:0.05+int4+zstd",
    "topk:0.03+int4+zstd",
    "topk:0.02+int4+zstd",
    "topk:0.01+int4+zstd",
]
TASKS: dict[str, dict[str, Any]] = {
    "digits": {"dataset": "digits", "devices": 10, "partition": "dirichlet:0.5"},
    "synthetic": {"dataset": "synthetic", "devices": 10, "partition": "iid", "model": "logreg"},
    "mnist5k": {"dataset": "mnist5k", "devices": 20, "partition": "shards:2"},
}


def run_one(cfg: SimConfig, keep: bool = False) -> dict[str, Any]:
    summary = simulate(cfg, say=lambda _line: None)
    records = [json.loads(line) for line in Path(summary["metrics"]).read_text().splitlines()]
    if not keep:  # models, checkpoints and agent state: ~20 MB a run; metrics stay
        for sub in ("agents", "aggregator", "broker"):
            shutil.rmtree(Path(cfg.out) / sub, ignore_errors=True)
    ok = [r for r in records if "version" in r]
    updates = sum(r["devices"] for r in ok)
    return {
        "codec": cfg.codec,
        "seed": cfg.seed,
        "rounds": summary["rounds"],
        "failed_rounds": summary["failed_rounds"],
        "updates": updates,
        "uplink_bytes": summary["uplink_bytes"],
        "downlink_bytes": summary["downlink_bytes"],
        "bytes_per_update": summary["uplink_bytes"] / max(updates, 1),
        "final_accuracy": summary["final_accuracy"],
        "accuracy_curve": [r.get("accuracy") for r in ok],
        "uplink_curve": [r["uplink_bytes"] for r in ok],
        "round_ids": [r["round"] for r in ok],
        "rejected": summary["rejected"],
        "wall_seconds": summary["wall_seconds"],
    }


def mark_target(run: dict[str, Any], target: float) -> None:
    """Add the first round (and the uplink bytes up to it) at which accuracy >= target."""
    run["rounds_to_target"] = run["uplink_to_target"] = None
    cumulative = 0
    for rid, acc, up in zip(
        run["round_ids"], run["accuracy_curve"], run["uplink_curve"], strict=True
    ):
        cumulative += up
        if acc is not None and acc >= target:
            run["rounds_to_target"], run["uplink_to_target"] = rid, cumulative
            return


def auto_target(runs: list[dict[str, Any]]) -> float:
    """95 % of fp32's mean final accuracy, rounded down to 0.01: for tasks where 0.90 is out
    of reach of every codec in 30 rounds (Synthetic, MNIST-5k with 2 shards per device)."""
    base = statistics.fmean(r["final_accuracy"] for r in runs if r["codec"] == BASELINE)
    return math.floor(0.95 * base * 100) / 100


def _mean(values: list[float | None]) -> float | None:
    """Mean over seeds, or None when any seed has no value (e.g. never reached the target)."""
    if not values or any(v is None for v in values):
        return None
    return statistics.fmean(v for v in values if v is not None)


def aggregate(runs: list[dict[str, Any]], codecs: list[str]) -> list[dict[str, Any]]:
    base = {r["seed"]: r for r in runs if r["codec"] == BASELINE}
    rows = []
    for codec in codecs:
        mine = [r for r in runs if r["codec"] == codec and r["seed"] in base]
        if not mine:
            continue

        def ratio(key: str, invert: bool = False, rs: list[dict[str, Any]] = mine) -> float | None:
            vals: list[float | None] = []
            for r in rs:
                b, c = base[r["seed"]][key], r[key]
                vals.append(None if b is None or c is None else (b / c if invert else c / b))
            return _mean(vals)

        rows.append(
            {
                "codec": codec,
                "seeds": [r["seed"] for r in mine],
                "bytes_per_update": statistics.fmean(r["bytes_per_update"] for r in mine),
                "uplink_bytes": statistics.fmean(r["uplink_bytes"] for r in mine),
                "uplink_x": ratio("uplink_bytes", invert=True),
                "per_update_x": ratio("bytes_per_update", invert=True),
                "final_accuracy": statistics.fmean(r["final_accuracy"] for r in mine),
                "accuracy_delta_pp": statistics.fmean(
                    100 * (r["final_accuracy"] - base[r["seed"]]["final_accuracy"]) for r in mine
                ),
                "accuracy_delta_pp_min": min(
                    100 * (r["final_accuracy"] - base[r["seed"]]["final_accuracy"]) for r in mine
                ),
                "seeds_reaching_target": sum(r["rounds_to_target"] is not None for r in mine),
                "rounds_to_target": _mean([r["rounds_to_target"] for r in mine]),
                "rounds_to_target_ratio": ratio("rounds_to_target"),
                "uplink_to_target_x": ratio("uplink_to_target", invert=True),
                "rejected": sum(sum(r["rejected"].values()) for r in mine),
            }
        )
    return rows


def _fmt(v: float | None, spec: str, none: str = "—") -> str:
    return none if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    target = meta["target"]
    lines = [
        f"{meta['task']}; {meta['rounds']} rounds; seeds {meta['seeds']}; mean over seeds; "
        f"ratios per seed against `fp32` in the same run; accuracy target {target:.2f}"
        + (" (auto: 95 % of fp32's final accuracy)" if meta["target_rule"] == "auto" else "")
        + ".",
        "",
        f"| codec | bytes/update | x less per update | uplink total | x less uplink | "
        f"final acc | Δ acc (pp) | worst seed Δ (pp) | rounds to {target:.2f} | "
        f"rounds vs fp32 | x less uplink to {target:.2f} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    n = len(meta["seeds"])
    for r in rows:
        reach = r["seeds_reaching_target"]
        rounds = _fmt(r["rounds_to_target"], ".1f") if reach == n else f"{reach}/{n} seeds"
        lines.append(
            f"| `{r['codec']}` | {r['bytes_per_update']:,.0f} | {_fmt(r['per_update_x'], '.1f')} "
            f"| {r['uplink_bytes'] / 1e6:.3f} MB | {_fmt(r['uplink_x'], '.1f')} "
            f"| {r['final_accuracy']:.4f} | {r['accuracy_delta_pp']:+.2f} "
            f"| {r['accuracy_delta_pp_min']:+.2f} | {rounds} "
            f"| {_fmt(r['rounds_to_target_ratio'], '.2f')} "
            f"| {_fmt(r['uplink_to_target_x'], '.1f')} |"
        )
    best = best_within(rows, 1.0)
    lines += [
        "",
        (
            f"Best uplink reduction within 1 pp of fp32 final accuracy (mean over seeds): "
            f"`{best['codec']}`, {best['uplink_x']:.1f}x ({best['accuracy_delta_pp']:+.2f} pp)."
            if best
            else "No codec stays within 1 pp of fp32."
        ),
        "",
        f"Command: `{meta['command']}` ({meta['wall_minutes']:.1f} min on {meta['machine']}).",
    ]
    return "\n".join(lines) + "\n"


def best_within(rows: list[dict[str, Any]], pp: float) -> dict[str, Any] | None:
    ok = [
        r
        for r in rows
        if r["codec"] != BASELINE and r["accuracy_delta_pp"] >= -pp and r["uplink_x"] is not None
    ]
    return max(ok, key=lambda r: r["uplink_x"]) if ok else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=sorted(TASKS), default="digits")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--devices", type=int, default=None, help="default: per dataset")
    p.add_argument("--partition", default=None, help="default: per dataset")
    p.add_argument("--codecs", default=",".join(CODECS), help="comma-separated; fp32 is added")
    p.add_argument(
        "--target",
        default=None,
        help="accuracy to reach: a number, or 'auto' = 95%% of fp32's mean final accuracy "
        "rounded down to 0.01 (default: 0.90 on digits, auto elsewhere)",
    )
    p.add_argument(
        "--keep-runs", action="store_true", help="keep each run's models and agent state"
    )
    p.add_argument("--out", type=Path, default=None, help="default runs/bench/compression/DATASET")
    args = p.parse_args(argv)

    logging.basicConfig(level=logging.ERROR)
    task = dict(TASKS[args.dataset])
    if args.devices is not None:
        task["devices"] = args.devices
    if args.partition is not None:
        task["partition"] = args.partition
    seeds = [int(s) for s in args.seeds.split(",")]
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    if BASELINE not in codecs:
        codecs.insert(0, BASELINE)
    out = args.out or ROOT / "runs" / "bench" / "compression" / args.dataset
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    runs = []
    for seed in seeds:  # seed-major: load on the machine hits every codec alike
        for codec in codecs:
            safe = codec.replace(":", "").replace("+", "_")
            cfg = SimConfig(
                out=out / "runs" / f"{safe}-seed{seed}",
                rounds=args.rounds,
                seed=seed,
                codec=codec,
                **task,
            )
            r = run_one(cfg, keep=args.keep_runs)
            runs.append(r)
            print(
                f"seed {seed} {codec:24s} {r['bytes_per_update']:9.0f} B/update  "
                f"acc {r['final_accuracy']:.4f}  ({r['wall_seconds']:.1f} s)",
                flush=True,
            )
    target_arg = args.target or ("0.90" if args.dataset == "digits" else "auto")
    target = auto_target(runs) if target_arg == "auto" else float(target_arg)
    for r in runs:
        mark_target(r, target)
    rows = aggregate(runs, codecs)
    partition = task["partition"] if args.dataset != "synthetic" else "natural"
    meta = {
        "task": (
            f"{args.dataset}, {task['devices']} devices, partition {partition}, "
            f"model {task.get('model', 'mlp')}, {cfg.epochs} local epochs, "
            f"batch {cfg.batch_size}, lr {cfg.lr}"
        ),
        "dataset": args.dataset,
        "rounds": args.rounds,
        "seeds": seeds,
        "target": target,
        "target_rule": target_arg,
        "command": shlex.join(["python", "bench/compression/run.py", *(argv or sys.argv[1:])]),
        "wall_minutes": (time.perf_counter() - t0) / 60,
        "machine": f"{platform.machine()}, {_cpus()} CPUs, Python {platform.python_version()}",
    }
    best = best_within(rows, 1.0)
    result = {"meta": meta, "rows": rows, "best_within_1pp": best, "runs": runs}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(rows, meta)
    (out / "results.md").write_text(table)
    print()
    print(table)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    raise SystemExit(main())
