"""FedProx vs FedAvg on Synthetic(1,1) with stragglers, over the real broker (issue 4).

The recipe of Li et al. (MLSys 2020), section 5.1: Synthetic(1,1), 30 devices, multinomial
logistic regression, 10 devices selected per round, E = 20 local epochs, batch 10, lr 0.01.
Systems heterogeneity: each round, 50 % or 90 % of the selected devices are stragglers that
run a uniformly random number of epochs in [1, E]. As in the paper,

- **FedAvg** drops the stragglers: they miss the round's deadline, so their work is lost;
- **FedProx** (mu = 1) keeps their partial work and adds the proximal term on every device.

Every run is ``simulation.fleet.simulate``: a Mosquitto on loopback, the aggregator and 30
agents each with its own MQTT session. Three seeds per setting; the table reports the final
central accuracy (mean and spread over seeds) and the mean of the last 10 rounds.

    .venv/bin/python bench/fedprox/run.py [--rounds 100] [--seeds 0,1,2]
        [--stragglers 0.5,0.9] [--round-timeout 2] [--out runs/bench/fedprox]

Writes ``OUT/results.json``, ``OUT/results.md`` and ``OUT/curves.png``. Needs the SimConfig
fields listed in ``REQUIRED_FIELDS``; exits with status 2 naming any that are missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from simulation.fleet import SimConfig, simulate  # noqa: E402

REQUIRED_FIELDS = {
    "strategy": "aggregation strategy name, e.g. 'fedprox'",
    "strategy_opts": "mapping KEY -> VALUE string, e.g. {'mu': '1'}",
    "clients_per_round": "devices selected per round (select_clients count)",
    "stragglers": "fraction of the selected devices that, each round, run U{1..E} epochs",
    "drop_stragglers": "stragglers miss the deadline and send nothing (FedAvg in the paper)",
}

RECIPE = {
    "dataset": "synthetic:1,1",
    "devices": 30,
    "clients_per_round": 10,
    "epochs": 20,
    "batch_size": 10,
    "lr": 0.01,
}

METHODS = {
    "fedavg": {"strategy": "fedavg", "strategy_opts": {}, "drop_stragglers": True},
    "fedprox mu=1": {"strategy": "fedprox", "strategy_opts": {"mu": "1"}, "drop_stragglers": False},
}


def missing_fields() -> list[str]:
    have = {f.name for f in dataclasses.fields(SimConfig)}
    return [f for f in REQUIRED_FIELDS if f not in have]


def accuracy_curve(metrics_path: Path, rounds: int) -> list[float | None]:
    """Central accuracy after each published version 1..rounds (None if never reached)."""
    by_version: dict[int, float] = {}
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
        if "version" in rec and "accuracy" in rec:
            by_version[int(rec["version"])] = float(rec["accuracy"])
    return [by_version.get(v) for v in range(1, rounds + 1)]


def run_one(out: Path, method: str, stragglers: float, seed: int, a: argparse.Namespace) -> dict:
    cfg = SimConfig(
        out=out,
        seed=seed,
        rounds=a.rounds,
        round_timeout=a.round_timeout,
        min_devices=1,
        stragglers=stragglers,
        **RECIPE,
        **METHODS[method],
    )
    t = time.perf_counter()
    summary = simulate(cfg, say=lambda s: None)
    curve = accuracy_curve(out / "metrics.jsonl", a.rounds)
    done = [c for c in curve if c is not None]
    return {
        "method": method,
        "stragglers": stragglers,
        "seed": seed,
        "final_accuracy": summary.get("final_accuracy"),
        "last10_mean": statistics.mean(done[-10:]) if done else None,
        "failed_rounds": summary.get("failed_rounds"),
        "wall_seconds": round(time.perf_counter() - t, 1),
        "curve": curve,
    }


def table(runs: list[dict]) -> str:
    lines = [
        "| stragglers | method | final accuracy (mean ± sd, 3 seeds) | last-10 mean | per seed |",
        "|---:|---|---:|---:|---|",
    ]
    keys = sorted({(r["stragglers"], r["method"]) for r in runs})
    for s, m in keys:
        rs = [r for r in runs if (r["stragglers"], r["method"]) == (s, m)]
        fin = [r["final_accuracy"] for r in rs if r["final_accuracy"] is not None]
        l10 = [r["last10_mean"] for r in rs if r["last10_mean"] is not None]
        sd = statistics.stdev(fin) if len(fin) > 1 else 0.0
        lines.append(
            f"| {s:.0%} | {m} | {statistics.mean(fin):.3f} ± {sd:.3f} | "
            f"{statistics.mean(l10):.3f} | {', '.join(f'{x:.3f}' for x in fin)} |"
        )
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = sorted({r["stragglers"] for r in runs})
    fig, axes = plt.subplots(1, len(levels), figsize=(5 * len(levels), 3.6), squeeze=False)
    for ax, s in zip(axes[0], levels, strict=True):
        for m in METHODS:
            curves = [r["curve"] for r in runs if (r["stragglers"], r["method"]) == (s, m)]
            if not curves:
                continue
            n = len(curves[0])
            mean = [
                statistics.mean(c[i] for c in curves if c[i] is not None)
                if any(c[i] is not None for c in curves)
                else float("nan")
                for i in range(n)
            ]
            ax.plot(range(1, n + 1), mean, label=m)
        ax.set_title(f"Synthetic(1,1), {s:.0%} stragglers")
        ax.set_xlabel("round")
        ax.set_ylabel("central test accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--stragglers", default="0.5,0.9")
    ap.add_argument(
        "--round-timeout",
        type=float,
        default=2.0,
        help="seconds; FedAvg rounds wait for it, since dropped stragglers never report",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "fedprox")
    a = ap.parse_args()
    missing = missing_fields()
    if missing:
        need = "\n".join(f"  {f}: {REQUIRED_FIELDS[f]}" for f in missing)
        sys.exit(f"simulation.fleet.SimConfig lacks fields this benchmark needs:\n{need}")
    cmd = " ".join([".venv/bin/python", "bench/fedprox/run.py", *sys.argv[1:]])
    runs = []
    for s in (float(x) for x in a.stragglers.split(",")):
        for seed in (int(x) for x in a.seeds.split(",")):
            for m in METHODS:
                out = (
                    a.out
                    / f"s{int(s * 100)}"
                    / m.replace(" ", "_").replace("=", "")
                    / f"seed{seed}"
                )
                r = run_one(out, m, s, seed, a)
                runs.append(r)
                print(
                    f"stragglers {s:.0%} {m:13s} seed {seed}: final {r['final_accuracy']:.3f} "
                    f"last-10 {r['last10_mean']:.3f} ({r['wall_seconds']} s)",
                    flush=True,
                )
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(
        json.dumps({"command": cmd, "recipe": RECIPE, "methods": METHODS, "runs": runs}, indent=1)
    )
    md = f"`{cmd}`\n\n" + table(runs)
    (a.out / "results.md").write_text(md)
    plot(runs, a.out / "curves.png")
    print(md)


if __name__ == "__main__":
    main()
