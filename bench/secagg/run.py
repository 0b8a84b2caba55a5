"""Secure aggregation against plain rounds on digits (issue 15).

For each fleet size and seed, three runs on the same split and initial model: plain FedAvg
(``--codec fp32``, the unquantized reference), secure aggregation without dropouts, and secure
aggregation with ``--secagg-dropout`` (default 0.2: each round a fifth of the devices vanish
at a random stage). Every run is ``simulation.fleet.simulate`` over its own Mosquitto on
loopback; uplink bytes are the MQTT packets the aggregator received (for secure rounds: key
adverts, sealed shares, masked vectors and unmask replies), relay bytes what it published for
the stages (announcements and inboxes). Wire bits per parameter are the masked vectors' packet
bytes x 8 over the parameters they carry; Flower's SecAgg+ sends 32.

    .venv/bin/python bench/secagg/run.py [--devices 10,50] [--seeds 0,1,2] [--rounds 30]
        [--dropout 0.2] [--out DIR]

Writes ``OUT/results.json`` and ``OUT/results.md`` (the table for docs/benchmarks.md).
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

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from simulation.fleet import SimConfig, simulate  # noqa: E402

FLOWER_BITS = 32  # SecAgg+ in Flower: 2^22 levels masked modulo 2^32, one uint32 per value


def run_one(cfg: SimConfig) -> dict[str, Any]:
    summary = simulate(cfg, say=lambda _line: None)
    records = [json.loads(line) for line in Path(summary["metrics"]).read_text().splitlines()]
    for sub in ("agents", "aggregator", "broker"):
        shutil.rmtree(Path(cfg.out) / sub, ignore_errors=True)
    ok = [r for r in records if "version" in r]
    sa = [r["secagg"] for r in ok if "secagg" in r]
    params = sa[0]["elements"] - 1 if sa else None
    return {
        "mode": _mode(cfg),
        "devices": cfg.devices,
        "seed": cfg.seed,
        "rounds": summary["rounds"],
        "published": len(ok),
        "failed_rounds": summary["failed_rounds"],
        "final_accuracy": summary["final_accuracy"],
        "updates": sum(r["devices"] for r in ok),
        "uplink_per_round": summary["uplink_bytes"] / max(len(ok), 1),
        "relay_per_round": sum(s["relay_bytes"] for s in sa) / max(len(sa), 1),
        "seconds_per_round": statistics.fmean(r["seconds"] for r in ok),
        "secagg": summary.get("secagg"),
        "params": params,
        "rejected": summary["rejected"],
    }


def _mode(cfg: SimConfig) -> str:
    if not cfg.secagg:
        return "plain fp32"
    return f"secagg, dropout {cfg.secagg_dropout:g}"


def _table(runs: list[dict[str, Any]], command: str) -> str:
    seeds = len({r["seed"] for r in runs})
    lines = [
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {platform.system()}, Python {platform.python_version()}, "
        "2 shared cores; each run its own Mosquitto on loopback.",
        "",
        f"| devices | mode | final accuracy (mean ± sd, {seeds} seeds) | Δ vs plain (pp) | failed "
        "rounds | uplink / round | of which keys, shares, replies | relay / round | s / round "
        "| wire bits / parameter |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    params = next((r["params"] for r in runs if r["params"]), None)
    for n in sorted({r["devices"] for r in runs}):
        modes = [r for r in runs if r["devices"] == n]
        plain = [r["final_accuracy"] for r in modes if r["mode"] == "plain fp32"]
        for mode in dict.fromkeys(r["mode"] for r in modes):
            rs = [r for r in modes if r["mode"] == mode]
            acc = [r["final_accuracy"] for r in rs]
            sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
            delta = 100 * (statistics.fmean(acc) - statistics.fmean(plain)) if plain else 0.0
            if rs[0]["secagg"]:
                bits = statistics.fmean(r["secagg"]["wire_bits_per_parameter"] for r in rs)
            else:  # whole update packets over the parameters they carry
                bits = statistics.fmean(
                    8 * r["uplink_per_round"] * r["rounds"] / max(r["updates"], 1) for r in rs
                ) / (params or 1)
            overhead = "-"
            if rs[0]["secagg"]:
                per_round = [
                    r["uplink_per_round"] - r["secagg"]["masked_bytes"] / max(_published(r), 1)
                    for r in rs
                ]
                overhead = f"{statistics.fmean(per_round) / 1e3:.1f} kB"
            lines.append(
                f"| {n} | {mode} | {statistics.fmean(acc):.4f} ± {sd:.4f} | {delta:+.2f} | "
                f"{sum(r['failed_rounds'] for r in rs)} | "
                f"{statistics.fmean(r['uplink_per_round'] for r in rs) / 1e3:.1f} kB | "
                f"{overhead} | "
                f"{statistics.fmean(r['relay_per_round'] for r in rs) / 1e3:.1f} kB | "
                f"{statistics.fmean(r['seconds_per_round'] for r in rs):.2f} | {bits:.2f} |"
            )
    lines.append("")
    lines.append(f"Flower's SecAgg+ sends {FLOWER_BITS} bits per parameter.")
    return "\n".join(lines) + "\n"


def _published(r: dict[str, Any]) -> int:
    return int(r.get("published", r["rounds"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default="10,50")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--partition", default="dirichlet:0.5")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "secagg" / "results")
    p.add_argument(
        "--table-only", metavar="COMMAND", help="re-render OUT/results.md from OUT/results.json"
    )
    a = p.parse_args()
    if a.table_only:
        runs_done = json.loads((a.out / "results.json").read_text())
        (a.out / "results.md").write_text(_table(runs_done, a.table_only))
        print(_table(runs_done, a.table_only))
        return
    logging.basicConfig(level=logging.ERROR)
    command = "python bench/secagg/run.py " + shlex.join(sys.argv[1:])
    runs: list[dict[str, Any]] = []
    for n in [int(x) for x in a.devices.split(",")]:
        for seed in [int(x) for x in a.seeds.split(",")]:
            for secagg, dropout in ((False, 0.0), (True, 0.0), (True, a.dropout)):
                cfg = SimConfig(
                    out=a.out / "runs" / f"n{n}-s{seed}-{int(secagg)}-{dropout:g}",
                    dataset="digits", devices=n, rounds=a.rounds, partition=a.partition,
                    seed=seed, codec=None if secagg else "fp32", secagg=secagg,
                    secagg_dropout=dropout, round_timeout=60,
                )  # fmt: skip
                t0 = time.time()
                r = run_one(cfg)
                print(
                    f"n={n} seed={seed} {r['mode']}: acc {r['final_accuracy']:.4f}, "
                    f"{r['failed_rounds']} failed, {time.time() - t0:.0f} s",
                    flush=True,
                )
                runs.append(r)
                (a.out / "results.json").write_text(json.dumps(runs, indent=1) + "\n")
    (a.out / "results.md").write_text(_table(runs, command))
    print(_table(runs, command))


if __name__ == "__main__":
    main()
