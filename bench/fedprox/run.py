"""FedProx vs FedAvg on Synthetic(1,1) with stragglers, over the real broker (issue 4).

The recipe of Li et al. (MLSys 2020), section 5.1: Synthetic(1,1), 30 devices, multinomial
logistic regression, 10 devices selected per round, E = 20 local epochs, batch 10, lr 0.01.
Systems heterogeneity: each round, 50 % or 90 % of the selected devices are stragglers that
run a uniformly random number of epochs in [1, E]. As in the paper,

- **FedAvg** drops the stragglers: they miss the round's deadline, so their work is lost;
- **FedProx** (mu = 1) keeps their partial work and adds the proximal term on every device.

Every run is ``simulation.fleet.simulate``: a Mosquitto on loopback, the aggregator and 30
agents each with its own MQTT session. Three seeds per setting; the table reports the central
accuracy after ``--rounds`` communication rounds (mean and spread over seeds) and the mean of
the last 10 rounds.

Rounds, not versions, are the x axis, as in the paper: a FedAvg round whose selected devices
all straggled (0.9^10 = 35 % of rounds at 90 %) publishes nothing (a failed round in the
metrics, quorum 1 not met) and the model stays as it was. The fleet runs until ``--rounds``
versions are published; the curve is then cut at round ``--rounds``.

A FedAvg round always waits out ``--round-timeout`` (dropped stragglers never answer), so it
must be long enough for every non-straggler to finish; FedProx rounds close as soon as every
selected device has answered, and their deadline ``--keep-timeout`` is only a safety net. The
table's "late" column counts the updates rejected as ``wrong_round`` from round 3 on: it must
be 0 (round 1 asks all 30 devices, as the aggregator does not know the fleet yet, so 20 of
its answers arrive late into rounds 1-2). A run whose ``summary.json`` shows the same
configuration is not run again (resume after a stop).

    .venv/bin/python bench/fedprox/run.py [--rounds 100] [--seeds 0,1,2]
        [--stragglers 0.5,0.9] [--round-timeout 5] [--keep-timeout 60] [--jobs 3]
        [--out runs/bench/fedprox]

Writes ``OUT/results.json``, ``OUT/results.md`` and ``OUT/curves.png``. Needs the SimConfig
fields listed in ``REQUIRED_FIELDS``; exits with status 2 naming any that are missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
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


def read_records(metrics_path: Path) -> list[dict]:
    return [json.loads(line) for line in metrics_path.read_text().splitlines()]


def accuracy_curve(records: list[dict], rounds: int) -> list[float | None]:
    """Central accuracy after each round 1..rounds: that of the last version published by
    then (a failed round keeps the model); None before the first version."""
    by_round = {int(r["round"]): float(r["accuracy"]) for r in records if "accuracy" in r}
    curve: list[float | None] = []
    acc = None
    for rnd in range(1, rounds + 1):
        acc = by_round.get(rnd, acc)
        curve.append(acc)
    return curve


def round_stats(records: list[dict], rounds: int) -> dict:
    """Versions, failed rounds, devices per version and late updates within rounds 1..rounds."""
    recs = [r for r in records if int(r["round"]) <= rounds]
    ok = [r for r in recs if "version" in r]
    late = sum(r.get("rejected", {}).get("wrong_round", 0) for r in recs if int(r["round"]) >= 3)
    return {
        "versions": len(ok),
        "failed": len(recs) - len(ok),
        "devices_mean": statistics.mean(r["devices"] for r in ok) if ok else 0.0,
        "late_after_round2": late,
    }


def run_one(out: Path, method: str, stragglers: float, seed: int, a: argparse.Namespace) -> dict:
    opts = METHODS[method]
    cfg = SimConfig(
        out=out,
        seed=seed,
        rounds=a.rounds,
        # Dropping: every round waits out the deadline. Keeping: a round closes once every
        # selected device has answered, and the deadline is only a safety net, long enough
        # that a loaded machine cannot make a device miss it.
        round_timeout=a.round_timeout[stragglers] if opts["drop_stragglers"] else a.keep_timeout,
        min_devices=1,
        stragglers=stragglers,
        **({"codec": a.codec} if a.codec else {}),
        **RECIPE,
        **opts,
    )
    summary = _done_before(out, cfg)
    if summary is None:
        summary = simulate(cfg, say=lambda s: None)
    records = read_records(out / "metrics.jsonl")
    curve = accuracy_curve(records, a.rounds)
    done = [c for c in curve if c is not None]
    return {
        "method": method,
        "stragglers": stragglers,
        "seed": seed,
        "final_accuracy": curve[-1],  # after round --rounds
        "last10_mean": statistics.mean(done[-10:]) if done else None,
        f"accuracy_at_version_{a.rounds}": summary.get("final_accuracy"),
        "rounds_run": max(int(r["round"]) for r in records),
        **round_stats(records, a.rounds),
        "rejected": summary.get("rejected"),
        "wall_seconds": round(summary["wall_seconds"] + summary["setup_seconds"], 1),
        "curve": curve,
    }


def _done_before(out: Path, cfg: SimConfig) -> dict | None:
    """The summary of a finished run of exactly ``cfg`` in ``out`` (resume after a stop)."""
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    want = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()}
    have = dict(summary.get("config", {}))
    for c in (want, have):
        c.pop("out", None)  # a finished run may have been moved here
    return summary if have == json.loads(json.dumps(want)) else None


def _pairs(text: str) -> list[tuple[str, str]]:
    return [tuple(kv.split(":", 1)) for kv in text.split(",")]  # type: ignore[misc]


def _run_job(job: tuple[Path, str, float, int, argparse.Namespace]) -> dict:
    import logging

    logging.basicConfig(level=logging.ERROR)  # rejected late updates are expected: no noise
    return run_one(*job)


def table(runs: list[dict]) -> str:
    lines = [
        "| stragglers | method | accuracy after R rounds (mean ± sd) | last-10 mean | per seed "
        "| versions | failed rounds | devices / version | late |",
        "|---:|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    keys = sorted({(r["stragglers"], r["method"]) for r in runs})
    for s, m in keys:
        rs = [r for r in runs if (r["stragglers"], r["method"]) == (s, m)]
        fin = [r["final_accuracy"] for r in rs if r["final_accuracy"] is not None]
        l10 = [r["last10_mean"] for r in rs if r["last10_mean"] is not None]
        sd = statistics.stdev(fin) if len(fin) > 1 else 0.0
        lines.append(
            f"| {s:.0%} | {m} | {statistics.mean(fin):.3f} ± {sd:.3f} | "
            f"{statistics.mean(l10):.3f} | {', '.join(f'{x:.3f}' for x in fin)} | "
            f"{statistics.mean(r['versions'] for r in rs):.1f} | "
            f"{statistics.mean(r['failed'] for r in rs):.1f} | "
            f"{statistics.mean(r['devices_mean'] for r in rs):.2f} | "
            f"{sum(r['late_after_round2'] for r in rs)} |"
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
        default="5",
        help="seconds, or S:T,S:T per straggler level; FedAvg rounds wait it out, since dropped "
        "stragglers never report",
    )
    ap.add_argument(
        "--methods", default=",".join(METHODS), help="a subset of: " + ", ".join(METHODS)
    )
    ap.add_argument(
        "--keep-timeout",
        type=float,
        default=60.0,
        help="seconds; the deadline of methods that keep stragglers (rounds close early)",
    )
    ap.add_argument("--codec", default=None, help="update codec (default: simulate's)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (each its own broker)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "fedprox")
    a = ap.parse_args()
    levels = [float(x) for x in a.stragglers.split(",")]
    if ":" in a.round_timeout:
        a.round_timeout = {float(k): float(v) for k, v in _pairs(a.round_timeout)}
    else:
        a.round_timeout = dict.fromkeys(levels, float(a.round_timeout))
    missing = missing_fields()
    if missing:
        need = "\n".join(f"  {f}: {REQUIRED_FIELDS[f]}" for f in missing)
        sys.exit(f"simulation.fleet.SimConfig lacks fields this benchmark needs:\n{need}")
    cmd = " ".join([".venv/bin/python", "bench/fedprox/run.py", *sys.argv[1:]])
    jobs = [
        (
            a.out / f"s{int(s * 100)}" / m.replace(" ", "_").replace("=", "") / f"seed{seed}",
            m,
            s,
            seed,
            a,
        )
        for s in levels
        for seed in (int(x) for x in a.seeds.split(","))
        for m in a.methods.split(",")
    ]
    # The longest runs first: FedAvg waits out every deadline (at 90 %, a third of rounds fail).
    jobs.sort(key=lambda j: (j[1] != "fedavg", -j[2]))
    runs = []
    ctx = multiprocessing.get_context("spawn")  # a fresh torch and broker per run
    with ProcessPoolExecutor(max_workers=a.jobs, mp_context=ctx) as pool:
        for r in pool.map(_run_job, jobs):
            runs.append(r)
            print(
                f"stragglers {r['stragglers']:.0%} {r['method']:13s} seed {r['seed']}: "
                f"final {r['final_accuracy']:.3f} last-10 {r['last10_mean']:.3f} "
                f"versions {r['versions']} failed {r['failed']} late {r['late_after_round2']} "
                f"({r['wall_seconds']} s)",
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
