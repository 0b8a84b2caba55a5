"""Bytes to accuracy in both directions: uplink codecs x downlink (full models or patches).

Every run is ``simulation.fleet.simulate`` over a Mosquitto of its own on loopback. Uplink
bytes are the MQTT PUBLISH packets of updates as the aggregator received them; downlink bytes
are every PUBLISH packet the devices received (full models, patches, tasks, receipts), counted
at the devices. Ratios are per seed against the ``fp32 / full`` row of the same seed, then
averaged over seeds.

    .venv/bin/python bench/bytes/run.py [--seeds 0,1,2] [--rounds 30]
        [--rows UP/DOWN,UP/DOWN,...] [--target 0.90] [--out DIR]

Rows name an uplink codec and a downlink codec (``full`` or a patch codec), e.g.
``fp32/full`` (the baseline, always run), ``topk:0.03+int4+zstd/topk:0.05+int8+zstd``; a
third part ``/no-feedback`` runs the aggregator with ``downlink_feedback: false`` (the server
continues from the devices' weights).
The task is ``make demo``'s fleet: digits, 10 devices, Dirichlet(0.5), 5 local epochs, lr 0.1.
``--dataset imu`` runs the IoT task instead: seglearn's watch IMU set, one device per subject
(10), the zoo's ``cnn1d``, 2 local epochs, lr 0.05, with its own default rows (``IMU_ROWS``),
20 rounds and target 0.70 unless given.
``--table-only`` recomputes the table (e.g. for another ``--target``) from OUT/results.json.
Writes ``OUT/results.json``, ``OUT/results.md`` (the table for docs/benchmarks.md) and
``OUT/accuracy_vs_bytes.png`` (``--plot-only`` redraws it from results.json): ``fedge
report``'s panels (``fedge_cli.report.render_series``: accuracy against versions, cumulative
uplink and cumulative total bytes), means over seeds per row.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from simulation import DEFAULT_DOWNLINK_CODEC, DEFAULT_SIM_CODEC  # noqa: E402
from simulation.fleet import SimConfig, simulate  # noqa: E402

BASELINE = "fp32/full"
TOTAL = (
    "total = uplink (the update PUBLISH packets the aggregator received) + downlink (every "
    "PUBLISH packet the devices received: full models, patches, tasks and their clearing on "
    "round close, receipts, cleared retained patches). Not in it: the devices' status "
    "PUBLISHes (one per connect and per model version held, the same number in every row; "
    "their own column, and the ratio with them) and MQTT control packets (CONNECT, SUBSCRIBE, "
    "PUBACK, PINGREQ)."
)
ROWS = [
    BASELINE,
    f"{DEFAULT_SIM_CODEC}/full",  # today's default before patches: compressed up, full down
    f"{DEFAULT_SIM_CODEC}/topk:0.1+int4+zstd",
    f"{DEFAULT_SIM_CODEC}/{DEFAULT_DOWNLINK_CODEC}",
    f"{DEFAULT_SIM_CODEC}/topk:0.05+int4+zstd",
    f"{DEFAULT_SIM_CODEC}/topk:0.05+int8+zstd",
    "topk:0.05+int4+zstd/topk:0.05+int4+zstd",
    "topk:0.04+int4+zstd/topk:0.05+int4+zstd",
    "topk:0.05+int4+zstd/topk:0.04+int4+zstd",
    f"{DEFAULT_SIM_CODEC}/{DEFAULT_DOWNLINK_CODEC}/no-feedback",
]


# The IoT task: one device per subject; the settings bench/pruning found to work on imu.
IMU_ROWS = [
    BASELINE,
    f"{DEFAULT_SIM_CODEC}/{DEFAULT_DOWNLINK_CODEC}",
    f"{DEFAULT_SIM_CODEC}/full",
    f"{DEFAULT_SIM_CODEC}/topk:0.2+int8+zstd",
    f"fp32/{DEFAULT_DOWNLINK_CODEC}",  # what the patches alone cost
    f"topk:0.1+int4+zstd/{DEFAULT_DOWNLINK_CODEC}",  # a denser uplink for the small CNN
]
TASKS: dict[str, dict[str, Any]] = {
    "digits": {"devices": 10, "partition": "dirichlet:0.5", "epochs": 5, "lr": 0.1},
    "imu": {"devices": 10, "partition": "iid", "epochs": 2, "lr": 0.05, "model": "cnn1d"},
}
TASK_LINES = {
    "digits": "digits, 10 devices, Dirichlet(0.5)",
    "imu": "imu (seglearn watch), 10 devices = 10 subjects, `cnn1d`, 2 local epochs, lr 0.05",
}
TASK_DEFAULTS = {"imu": {"rows": IMU_ROWS, "rounds": 20, "target": 0.70}}


def run_one(row: str, seed: int, rounds: int, out: Path, dataset: str = "digits") -> dict[str, Any]:
    """``row`` = UP/DOWN, or UP/DOWN/no-feedback (the server continues from the view)."""
    up, down, *rest = row.split("/")
    cfg = SimConfig(
        out=out, dataset=dataset, seed=seed, rounds=rounds, codec=up, downlink_codec=down,
        downlink_feedback=rest != ["no-feedback"], **TASKS[dataset],
    )  # fmt: skip
    s = simulate(cfg, say=lambda _line: None)
    records = [json.loads(line) for line in Path(s["metrics"]).read_text().splitlines()]
    shutil.rmtree(out, ignore_errors=True)  # what the table needs is read above
    ok = [r for r in records if "version" in r]
    return {
        "row": row,
        "seed": seed,
        "final_accuracy": s["final_accuracy"],
        "uplink_bytes": s["uplink_bytes"],
        "downlink_bytes": s["downlink_bytes"],
        "downlink_patch_bytes": s["downlink_patch_bytes"],
        "downlink_model_bytes": s["downlink_model_bytes"],
        "downlink_task_bytes": s["downlink_task_bytes"],
        "resyncs": s["resyncs"],
        "total_bytes": s["uplink_bytes"] + s["downlink_bytes"],
        "status_bytes": s["status_bytes"],
        "accuracy_curve": [r.get("accuracy") for r in ok],
        "uplink_curve": [r["uplink_bytes"] for r in ok],
        "total_curve": [
            r["uplink_bytes"] + d for r, d in zip(ok, s["downlink_curve"], strict=False)
        ],
        "failed_rounds": s["failed_rounds"],
        # Updates folded per version: fewer than the fleet when one came after its round closed.
        "devices_per_version": [r.get("devices") for r in ok],
        "wall_seconds": s["wall_seconds"],
    }


def to_target(run: dict[str, Any], target: float) -> int | None:
    """Cumulative bytes (both ways) when accuracy first reaches ``target``."""
    total = 0
    for acc, b in zip(run["accuracy_curve"], run["total_curve"], strict=False):
        total += b
        if acc is not None and acc >= target:
            return total
    return None


def aggregate(runs: list[dict[str, Any]], rows: list[str], target: float) -> list[dict[str, Any]]:
    base = {r["seed"]: r for r in runs if r["row"] == BASELINE}
    out = []
    for row in rows:
        mine = [r for r in runs if r["row"] == row and r["seed"] in base]
        if not mine:
            continue
        reach = [to_target(r, target) for r in mine]
        base_reach = [to_target(base[r["seed"]], target) for r in mine]
        out.append(
            {
                "row": row,
                "final_accuracy": statistics.fmean(r["final_accuracy"] for r in mine),
                "delta_pp": statistics.fmean(
                    100 * (r["final_accuracy"] - base[r["seed"]]["final_accuracy"]) for r in mine
                ),
                "uplink_bytes": statistics.fmean(r["uplink_bytes"] for r in mine),
                "downlink_bytes": statistics.fmean(r["downlink_bytes"] for r in mine),
                "downlink_model_bytes": statistics.fmean(r["downlink_model_bytes"] for r in mine),
                "downlink_patch_bytes": statistics.fmean(r["downlink_patch_bytes"] for r in mine),
                "total_bytes": statistics.fmean(r["total_bytes"] for r in mine),
                "total_x": statistics.fmean(
                    base[r["seed"]]["total_bytes"] / r["total_bytes"] for r in mine
                ),
                "to_target": None if None in reach else statistics.fmean(reach),  # type: ignore[arg-type]
                "to_target_x": None
                if None in reach or None in base_reach
                else statistics.fmean(b / c for b, c in zip(base_reach, reach, strict=True)),  # type: ignore[operator]
                "resyncs": sum(r["resyncs"] for r in mine),
                "status_bytes": statistics.fmean(r["status_bytes"] for r in mine),
                "total_x_with_status": statistics.fmean(
                    (base[r["seed"]]["total_bytes"] + base[r["seed"]]["status_bytes"])
                    / (r["total_bytes"] + r["status_bytes"])
                    for r in mine
                ),
            }
        )
    return out


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    t = meta["target"]
    task = TASK_LINES[meta.get("dataset", "digits")]
    lines = [
        f"{task}, {meta['rounds']} rounds, seeds {meta['seeds']}; "
        f"means over seeds; ratios per seed against `{BASELINE}`. {TOTAL}",
        "",
        f"| uplink / downlink | final acc | Δ acc (pp) | uplink | downlink (full models + "
        f"patches) | total | x less total | total to acc {t:.2f} | x less to {t:.2f} | "
        "statuses (not in total) | x less with statuses |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        tt = "—" if r["to_target"] is None else f"{r['to_target'] / 1e6:.3f} MB"
        tx = "—" if r["to_target_x"] is None else f"{r['to_target_x']:.1f}"
        lines.append(
            f"| `{r['row']}` | {r['final_accuracy']:.4f} | {r['delta_pp']:+.2f} | "
            f"{r['uplink_bytes'] / 1e6:.3f} MB | {r['downlink_bytes'] / 1e6:.3f} MB "
            f"({r['downlink_model_bytes'] / 1e6:.3f} + {r['downlink_patch_bytes'] / 1e6:.3f}) | "
            f"{r['total_bytes'] / 1e6:.3f} MB | {r['total_x']:.1f} | {tt} | {tx} | "
            f"{r['status_bytes'] / 1e6:.3f} MB | {r['total_x_with_status']:.1f} |"
        )
    lines += ["", f"Command: `{meta['command']}` ({meta['wall_minutes']:.1f} min on "
              f"{meta['machine']})."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(runs: list[dict[str, Any]], rows: list[str], path: Path) -> None:
    """Accuracy against cumulative bytes (both ways, log scale), mean over seeds per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for row in rows:
        mine = [r for r in runs if r["row"] == row]
        n = min(len(r["total_curve"]) for r in mine)
        x = np.mean([np.cumsum(r["total_curve"][:n]) for r in mine], axis=0)
        y = np.mean([[a or 0.0 for a in r["accuracy_curve"][:n]] for r in mine], axis=0)
        ax.plot(x, y, label=row, lw=1.2)
    ax.set_xscale("log")
    ax.set_xlabel("cumulative bytes, uplink + downlink (MQTT packets)")
    ax.set_ylabel("central accuracy of the model devices hold")
    ax.set_ylim(0.5, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_report(runs: list[dict[str, Any]], rows: list[str], path: Path, title: str) -> None:
    """The same means over seeds through ``fedge report``'s panels: accuracy against versions,
    cumulative uplink bytes and cumulative total bytes (uplink + downlink)."""
    from fedge_cli.report import RunSeries, render_series

    series = []
    for row in rows:
        mine = [r for r in runs if r["row"] == row]
        n = min(len(r["total_curve"]) for r in mine)
        acc = np.mean([[a or 0.0 for a in r["accuracy_curve"][:n]] for r in mine], axis=0)
        up = np.mean([np.cumsum(r["uplink_curve"][:n]) for r in mine], axis=0)
        total = np.mean([np.cumsum(r["total_curve"][:n]) for r in mine], axis=0)
        series.append(
            RunSeries(
                Path(row),
                {},
                tuple(range(1, n + 1)),
                tuple(float(a) for a in acc),
                tuple(int(b) for b in up),
                tuple(int(b) for b in total),
            )
        )
    render_series(series, path, labels=rows, title=title)


def draw(runs: list[dict[str, Any]], rows: list[str], path: Path, meta: dict[str, Any]) -> None:
    """``fedge report``'s panels when the runs kept their uplink curve (older results.json
    files did not: the single total-bytes panel above)."""
    if all("uplink_curve" in r for r in runs):
        task = TASK_LINES[meta.get("dataset", "digits")].replace("`", "")
        plot_report(runs, rows, path, f"{task}, means over seeds {meta['seeds']}")
    else:
        plot(runs, rows, path)


def merge(args: argparse.Namespace, dirs: list[Path]) -> None:
    """One table and plot from runs written by several processes (their runs.jsonl)."""
    every = [json.loads(s) for d in dirs for s in (d / "runs.jsonl").read_text().splitlines()]
    # A row and seed run twice (the baseline runs in every process): the first one counts.
    runs = list({(r["row"], r["seed"]): r for r in reversed(every)}.values())[::-1]
    wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    rows = [r for r in wanted if any(x["row"] == r for x in runs)]
    meta = {
        "dataset": args.dataset,
        "rounds": args.rounds,
        "seeds": sorted({r["seed"] for r in runs}),
        "target": args.target,
        "command": "python bench/bytes/run.py " + shlex.join(sys.argv[1:]),
        "wall_minutes": sum(r.get("wall_seconds", 0.0) for r in runs) / 60,
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, "
        f"Python {platform.python_version()}; minutes: the runs' walls summed",
    }
    agg = aggregate(runs, rows, args.target)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": agg, "runs": runs}))
    draw(runs, rows, args.out / "accuracy_vs_bytes.png", meta)
    md = markdown(agg, meta)
    (args.out / "results.md").write_text(md)
    print(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--target", type=float, default=0.90)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "bytes" / "results")
    ap.add_argument("--plot-only", action="store_true", help="redraw OUT/accuracy_vs_bytes.png")
    ap.add_argument("--dataset", choices=sorted(TASKS), default="digits")
    ap.add_argument("--table-only", action="store_true", help="redo OUT/results.md from its json")
    ap.add_argument(
        "--merge",
        default="",
        help="DIR,DIR,...: OUT/results.* from the runs.jsonl of those --out directories "
        "(e.g. one process per seed); --rows orders them",
    )
    known, _ = ap.parse_known_args()
    if known.dataset != "digits":  # the task's own defaults; digits keeps the ones above
        extra = TASK_DEFAULTS.get(known.dataset, {})
        ap.set_defaults(
            rows=",".join(extra.get("rows", ROWS)),
            rounds=extra.get("rounds", 30),
            target=extra.get("target", 0.90),
            out=ROOT / "bench" / "bytes" / f"results-{known.dataset}",
        )
    args = ap.parse_args()
    if args.merge:
        merge(args, [Path(d) for d in args.merge.split(",") if d])
        return
    if args.table_only:
        saved = json.loads((args.out / "results.json").read_text())
        meta = {**saved["meta"], "target": args.target}
        rows_run = [r["row"] for r in saved["rows"]]
        md = markdown(aggregate(saved["runs"], rows_run, args.target), meta)
        (args.out / "results.md").write_text(md)
        print(md)
        return
    if args.plot_only:
        saved = json.loads((args.out / "results.json").read_text())
        rows_run = [r["row"] for r in saved["rows"]]
        draw(saved["runs"], rows_run, args.out / "accuracy_vs_bytes.png", saved["meta"])
        return
    logging.basicConfig(level=logging.ERROR)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if BASELINE not in rows:
        rows.insert(0, BASELINE)
    t0 = time.perf_counter()
    runs = []
    for seed in seeds:
        for row in rows:
            r = run_one(
                row,
                seed,
                args.rounds,
                args.out / "runs" / f"{row.replace('/', '_')}-{seed}",
                args.dataset,
            )
            print(
                f"seed {seed} {row}: acc {r['final_accuracy']:.4f} up {r['uplink_bytes']} "
                f"down {r['downlink_bytes']} (models {r['downlink_model_bytes']}, patches "
                f"{r['downlink_patch_bytes']}) resyncs {r['resyncs']} updates per version "
                f"{min(r['devices_per_version'], default=0)}-"
                f"{max(r['devices_per_version'], default=0)}",
                flush=True,
            )
            runs.append(r)
            args.out.mkdir(parents=True, exist_ok=True)
            with (args.out / "runs.jsonl").open("a") as f:  # kept if the grid is cut short
                f.write(json.dumps(r) + "\n")
    agg = aggregate(runs, rows, args.target)
    meta = {
        "dataset": args.dataset,
        "rounds": args.rounds,
        "seeds": seeds,
        "target": args.target,
        "command": "python bench/bytes/run.py " + shlex.join(sys.argv[1:]),
        "wall_minutes": (time.perf_counter() - t0) / 60,
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, "
        f"Python {platform.python_version()}",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": agg, "runs": runs}))
    draw(runs, rows, args.out / "accuracy_vs_bytes.png", meta)
    md = markdown(agg, meta)
    (args.out / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
