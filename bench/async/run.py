"""Async (FedBuff) vs sync FedAvg when devices differ 10x in speed, over the real broker.

digits, 20 devices, Dirichlet(0.5) labels, MLP, 5 local epochs, lr 0.1, fp32 deltas. Every
device gets a fixed simulated compute time ``SimConfig.device_delay``: 20 values log-spaced
from ``d`` to ``10 d`` seconds (default d = 0.5), assigned to devices by a seeded permutation,
added after its real local training (a timer, so slow devices do not hold up fast ones).

- **sync**: FedAvg rounds with a barrier, every device asked every round, the deadline long
  enough for the slowest device (``--round-timeout``, default 60 s): a round lasts about as
  long as the slowest device, and closes as soon as every device has answered.
- **sync-deadline** (optional, ``--methods``): the same with a round deadline of ``4 d``
  and quorum 10, as a fleet that does not wait for its slow devices would run: the slowest
  devices then never make it, and their data never count.
- **async K=k**: FedBuff, a version every K updates, staleness weight and window as the
  aggregator's defaults (``poly:0.5``, updates more than 8 versions old dropped).

The clock is the metrics' ``ts`` (wall time); zero is the fleet's start (``simulate``'s
set-up done: broker, aggregator and every agent started). Reported per run: seconds,
versions, rounds and uplink bytes (every update received, counted or rejected) until the
first version whose central accuracy reaches ``--target`` (0.90).

    .venv/bin/python bench/async/run.py [--seeds 0,1,2] [--delay 0.5]
        [--methods sync,async:10,async:5] [--out runs/bench/async]

Writes ``OUT/results.json`` and ``OUT/results.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from simulation.fleet import SimConfig, device_delays, simulate  # noqa: E402

FLEET = {
    "dataset": "digits",
    "devices": 20,
    "partition": "dirichlet:0.5",
    "epochs": 5,
    "lr": 0.1,
    "codec": "fp32",
}


def method_config(method: str, a: argparse.Namespace) -> dict:
    name, _, arg = method.partition(":")
    if name == "sync":
        return {"mode": "sync", "rounds": a.sync_rounds, "round_timeout": a.round_timeout}
    if name == "sync-deadline":
        return {
            "mode": "sync",
            "rounds": a.sync_rounds,
            "round_timeout": 4 * a.delay,
            "min_devices": FLEET["devices"] // 2,
        }
    if name == "async":
        return {
            "mode": "async",
            "async_buffer": int(arg or 10),
            "rounds": a.async_versions,
            "round_timeout": a.round_timeout,
            "min_devices": 1,
        }
    raise SystemExit(f"unknown method {method!r}: sync, sync-deadline or async:K")


def time_to_target(records: list[dict], target: float, t0: float) -> dict:
    """Cost until the first version at or above ``target`` (None when never reached)."""
    uplink = 0
    updates = 0
    for r in records:
        uplink += r["uplink_bytes"]
        if "version" not in r:
            continue
        updates += r["devices"]
        if r.get("accuracy", 0.0) >= target:
            return {
                "seconds": round(r["ts"] - t0, 2),
                "versions": r["version"],
                "rounds": r["round"],
                "updates": updates,
                "uplink_bytes": uplink,
            }
    return dict.fromkeys(("seconds", "versions", "rounds", "updates", "uplink_bytes"))


def run_dir(root: Path, method: str, seed: int) -> Path:
    return root / method.replace(":", "") / f"seed{seed}"


def slow_share(metrics_path: Path, seed: int, delay: float, slowest: int = 5) -> float:
    """Share of the counted updates that came from the ``slowest`` slowest devices."""
    d = device_delays((delay, 10 * delay), FLEET["devices"], seed)
    slow = {f"dev-{i:04d}" for i in sorted(range(len(d)), key=d.__getitem__)[-slowest:]}
    counted = [
        k.split("@")[0]
        for line in metrics_path.read_text().splitlines()
        for k in json.loads(line).get("counted", {})
    ]
    return sum(dev in slow for dev in counted) / max(len(counted), 1)


def accuracy_at(curve: list, seconds: float) -> float | None:
    """Central accuracy of the last version published by ``seconds`` after the start."""
    before = [acc for t, _, acc in curve if t <= seconds]
    return before[-1] if before else None


def run_one(method: str, seed: int, a: argparse.Namespace) -> dict:
    out = run_dir(a.out, method, seed)
    cfg = SimConfig(
        out=out,
        seed=seed,
        device_delay=(a.delay, 10 * a.delay),
        **FLEET,
        **method_config(method, a),
    )
    t, wall0 = time.perf_counter(), time.time()
    summary = simulate(cfg, say=lambda _s: None)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ok = [r for r in records if "version" in r]
    t0 = wall0 + summary["setup_seconds"]  # the fleet's start: every agent started
    return {
        "method": method,
        "seed": seed,
        "to_target": time_to_target(records, a.target, t0),
        "final_accuracy": summary["final_accuracy"],
        "best_accuracy": max(r.get("accuracy", 0.0) for r in ok),
        "versions": summary["rounds"],
        "failed_rounds": summary["failed_rounds"],
        "run_seconds": round(ok[-1]["ts"] - t0, 1),
        "uplink_bytes": summary["uplink_bytes"],
        "staleness_max": max(r["staleness_max"] for r in ok),
        "rejected": summary["rejected"],
        "wall_seconds": round(time.perf_counter() - t, 1),
        "curve": [(round(r["ts"] - t0, 2), r["version"], r.get("accuracy")) for r in ok],
    }


def _fmt(xs: list, spec: str) -> str:
    """mean (min-max) over the seeds that reached the target; n/N when some did not."""
    got = [x for x in xs if x is not None]
    if not got:
        return "not reached"
    s = f"{statistics.mean(got):{spec}} ({min(got):{spec}}-{max(got):{spec}})"
    return s if len(got) == len(xs) else f"{s}, {len(got)}/{len(xs)} seeds"


def table(runs: list[dict], a: argparse.Namespace) -> str:
    target = a.target
    lines = [
        f"| method | seconds to {target:.2f} | versions to {target:.2f} | rounds to {target:.2f} "
        f"| updates to {target:.2f} | uplink to {target:.2f} (MB) | accuracy at {a.at:.0f} s "
        "| final accuracy | updates from the 5 slowest devices | rejected (all seeds) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for m in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == m]
        tt = [r["to_target"] for r in rs]
        rejected: dict[str, int] = {}
        for r in rs:
            for k, v in r["rejected"].items():
                rejected[k] = rejected.get(k, 0) + v
        up = [t["uplink_bytes"] / 1e6 if t["uplink_bytes"] is not None else None for t in tt]
        at = [accuracy_at(r["curve"], a.at) for r in rs]
        share = [
            slow_share(run_dir(a.out, m, r["seed"]) / "metrics.jsonl", r["seed"], a.delay)
            for r in rs
        ]
        lines.append(
            f"| {m} | {_fmt([t['seconds'] for t in tt], '.1f')} "
            f"| {_fmt([t['versions'] for t in tt], '.1f')} "
            f"| {_fmt([t['rounds'] for t in tt], '.1f')} "
            f"| {_fmt([t['updates'] for t in tt], '.0f')} "
            f"| {_fmt(up, '.2f')} "
            f"| {_fmt(at, '.3f')} "
            f"| {statistics.mean(r['final_accuracy'] for r in rs):.3f} after "
            f"{statistics.mean(r['run_seconds'] for r in rs):.0f} s "
            f"| {statistics.mean(share):.1%} "
            f"| {', '.join(f'{k} {v}' for k, v in sorted(rejected.items())) or 'none'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default="sync,async:10,async:5")
    ap.add_argument("--delay", type=float, default=0.5, help="fastest device's extra seconds")
    ap.add_argument("--target", type=float, default=0.90)
    ap.add_argument("--sync-rounds", type=int, default=25)
    ap.add_argument("--async-versions", type=int, default=80)
    ap.add_argument("--round-timeout", type=float, default=60.0)
    ap.add_argument("--at", type=float, default=60.0, help="also report accuracy at SECONDS")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "async")
    ap.add_argument(
        "--table-only",
        action="store_true",
        help="rewrite OUT/results.md from OUT/results.json and the runs' metrics; run nothing",
    )
    a = ap.parse_args()
    if a.table_only:
        saved = json.loads((a.out / "results.json").read_text())
        a.delay = saved["delay"]
        md = f"`{saved['command']}`\n\n" + table(saved["runs"], a)
        (a.out / "results.md").write_text(md)
        print(md)
        return
    logging.basicConfig(level=logging.ERROR)  # rejected stale updates are expected: no noise
    cmd = " ".join([".venv/bin/python", "bench/async/run.py", *sys.argv[1:]])
    runs = []
    for seed in (int(x) for x in a.seeds.split(",")):
        for m in a.methods.split(","):
            r = run_one(m, seed, a)
            runs.append(r)
            tt = r["to_target"]
            print(
                f"{m:14s} seed {seed}: {a.target} after {tt['seconds']} s, "
                f"v{tt['versions']}, {tt['updates']} updates, {tt['uplink_bytes']} B; "
                f"final {r['final_accuracy']:.3f} at {r['run_seconds']} s; "
                f"rejected {r['rejected']} ({r['wall_seconds']} s)",
                flush=True,
            )
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(
        json.dumps({"command": cmd, "fleet": FLEET, "delay": a.delay, "runs": runs}, indent=1)
    )
    md = f"`{cmd}`\n\n" + table(runs, a)
    (a.out / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
