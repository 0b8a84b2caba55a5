"""fedge vs Flower on the same task, side by side, in one run (issue 7).

Task: scikit-learn digits, 10 devices, Dirichlet(0.5) label partition with seed 0 (fedge's
``make_federated`` cut, written once to npz and read by both sides), MLP 64-64-10 from the
same initial weights, 1 local epoch, batch 32, SGD lr 0.05, 30 rounds, FedAvg, central
evaluation after every round.

- fedge: ``fedge simulate ...`` as a subprocess; it starts its own Mosquitto, and every
  device is a real MQTT session over loopback.
- Flower: ``flower_app.py`` in Flower's own virtual environment (created here on first use),
  on its simulation engine (``run_simulation``, Ray backend, 2 CPUs, one actor per CPU).

Each framework's whole process tree (Mosquitto, Ray's GCS, raylet and workers included) is
polled with psutil for wall time and peak memory (RSS sum and PSS sum). The pairs run
interleaved ``--repeat`` times; the table reports medians and fedge/Flower ratios.

    .venv/bin/python bench/vs_flower/run.py [--repeat 3] [--codecs int8+zstd,...]
        [--out runs/bench/vs_flower]

Writes ``OUT/results.json``, ``OUT/results.md`` (the table for docs/benchmarks.md),
``OUT/report.png`` (``fedge report`` of the first repetition) and one run directory per
framework and repetition.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from proctree import run_measured  # noqa: E402

FLOWER_VENV = HERE / ".venv-flower"
# flwr 1.42.0 pins certifi>=2026.10.19, which the package index here does not serve;
# 1.41.0 installs with Ray 2.55.1 on Python 3.11.
FLOWER_PINS = ("flwr[simulation]==1.41.0", "scikit-learn==1.9.1")
# The CPU build on this disk; installed first, or flwr's torch-free extras pull nothing
# but a later unpinned torch would pull CUDA.
TORCH_PIN = "torch==2.13.0"

TASK = {
    "dataset": "digits",
    "devices": 10,
    "partition": "dirichlet:0.5",
    "seed": 0,
    "rounds": 30,
    "epochs": 1,
    "batch_size": 32,
    "lr": 0.05,
}
# Codecs tried in this order; those the installed fedge does not know are skipped.
DEFAULT_CODECS = "int8+zstd,topk:0.1+int8+zstd,topk:0.05+int8+zstd"


def ensure_flower_venv(venv: Path = FLOWER_VENV) -> Path:
    """Create Flower's virtual environment once; return its python."""
    py = venv / "bin" / "python"
    stamp = venv / ".installed"
    if stamp.is_file() and py.is_file():
        return py
    if not py.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, TORCH_PIN], check=True)
    subprocess.run([*pip, *FLOWER_PINS], check=True)
    stamp.write_text("\n".join((TORCH_PIN, *FLOWER_PINS)) + "\n")
    return py


def write_partition(out: Path) -> Path:
    from simulation.datasets import make_federated, write_npz_partitions

    data = make_federated(TASK["dataset"], TASK["devices"], TASK["partition"], TASK["seed"])
    write_npz_partitions(data, out)
    return out


def known_codecs(names: list[str]) -> list[str]:
    try:
        from fedge.codecs import parse_codec
    except ImportError:
        return []
    ok = []
    for n in names:
        try:
            parse_codec(n)
        except ValueError:
            print(f"codec {n!r} unknown to this fedge: skipped", file=sys.stderr)
        else:
            ok.append(n)
    return ok


def default_codec() -> str:
    from simulation import default_codec as sim_default

    return sim_default("fedavg")


def fedge_cmd(out: Path, codec: str | None) -> list[str]:
    t = TASK
    cmd = [
        str(ROOT / ".venv" / "bin" / "fedge"), "simulate",
        "--dataset", t["dataset"], "--devices", t["devices"], "--rounds", t["rounds"],
        "--epochs", t["epochs"], "--lr", t["lr"], "--batch-size", t["batch_size"],
        "--partition", t["partition"], "--seed", t["seed"], "--out", out,
    ]  # fmt: skip
    if codec is not None:
        cmd += ["--codec", codec]
    return [str(c) for c in cmd]


def flower_cmd(py: Path, data: Path, out: Path) -> list[str]:
    t = TASK
    return [
        str(c)
        for c in (
            py, HERE / "flower_app.py", "--data", data, "--out", out, "--rounds", t["rounds"],
            "--epochs", t["epochs"], "--batch-size", t["batch_size"], "--lr", t["lr"],
            "--partition", t["partition"], "--seed", t["seed"],
        )
    ]  # fmt: skip


def one_run(name: str, cmd: list[str], out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", RAY_USAGE_STATS_ENABLED="0")
    tree = run_measured(cmd, env=env, log=out / "stdout.log", cwd=out, timeout=1800)
    if tree.returncode != 0:
        raise SystemExit(f"{name} failed (exit {tree.returncode}); see {out / 'stdout.log'}")
    summary = json.loads((out / "summary.json").read_text())
    rec = {
        "name": name,
        "run_dir": str(out),
        **tree.as_dict(),
        "final_accuracy": summary["final_accuracy"],
        "uplink_bytes": summary["uplink_bytes"],
        "downlink_bytes": summary["downlink_bytes"],
        "inner_seconds": summary["wall_seconds"],
    }
    print(
        f"{name:32s} wall {tree.wall_seconds:6.1f} s | RSS {tree.peak_rss_bytes / 2**20:7.0f} MiB"
        f" | PSS {tree.peak_pss_bytes / 2**20:7.0f} MiB | procs {tree.peak_processes:3d}"
        f" | acc {summary['final_accuracy']:.4f} | up {summary['uplink_bytes']:>10d} B"
        f" | down {summary['downlink_bytes']:>10d} B",
        flush=True,
    )
    return rec


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def table(results: dict[str, list[dict[str, Any]]], base: str) -> str:
    cols = [
        ("wall (s)", "wall_seconds", lambda v: f"{v:.1f}"),
        ("peak RSS, tree (MiB)", "peak_rss_bytes", lambda v: f"{v / 2**20:.0f}"),
        ("peak PSS, tree (MiB)", "peak_pss_bytes", lambda v: f"{v / 2**20:.0f}"),
        ("final acc.", "final_accuracy", lambda v: f"{v:.4f}"),
        ("uplink (B)", "uplink_bytes", lambda v: f"{v:,.0f}"),
        ("downlink (B)", "downlink_bytes", lambda v: f"{v:,.0f}"),
    ]
    lines = [
        "| run | " + " | ".join(c[0] for c in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for name, runs in results.items():
        lines.append(
            f"| {name} | " + " | ".join(fmt(median_of(runs, k)) for _, k, fmt in cols) + " |"
        )
    b = results[base]
    for name, runs in results.items():
        if name == base:
            continue
        cells = []
        for _, k, _fmt in cols:
            if k == "final_accuracy":
                cells.append(f"{(median_of(runs, k) - median_of(b, k)) * 100:+.1f} pp")
            else:
                cells.append(f"{median_of(runs, k) / median_of(b, k):.3f}x")
        lines.append(f"| **{name} / {base}** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "vs_flower")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--codecs", default=DEFAULT_CODECS, help="comma-separated; '' for none")
    p.add_argument("--skip-install", action="store_true", help="use .venv-flower as it is")
    args = p.parse_args()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    flower_py = FLOWER_VENV / "bin" / "python" if args.skip_install else ensure_flower_venv()
    data = write_partition(out / "data")
    codecs = known_codecs([c for c in args.codecs.split(",") if c.strip()])

    default = default_codec()
    plan: list[tuple[str, Any]] = [("flower", None), ("fedge fp32", "fp32")]
    if default != "fp32":
        plan.append((f"fedge default ({default})", None))
    plan += [(f"fedge {c}", c) for c in codecs if c not in ("fp32", default)]
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in plan}
    for rep in range(args.repeat):
        for name, codec in plan:
            slug = "".join(ch if ch.isalnum() or ch in ".+-" else "-" for ch in name)
            d = out / f"{slug}-r{rep}"
            cmd = flower_cmd(flower_py, data, d) if name == "flower" else fedge_cmd(d, codec)
            results[name].append(one_run(name, cmd, d))

    md = table(results, "flower")
    commands = {name: " ".join(runs[0]["cmd"].split()) for name, runs in results.items()}
    (out / "results.json").write_text(
        json.dumps(
            {
                "task": TASK,
                "repeat": args.repeat,
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "commands": commands,
                "runs": results,
            },
            indent=2,
        )
        + "\n"
    )
    (out / "results.md").write_text(md + "\n")
    from fedge_cli.report import render_report

    png = render_report([Path(runs[0]["run_dir"]) for runs in results.values()], out / "report.png")
    print()
    print(md)
    print(f"\nplot: {png}")


if __name__ == "__main__":
    main()
