"""Accuracy cost of central DP (DP-FedAvg) over the real broker.

    .venv/bin/python bench/dp/run.py [--devices 10 100] [--rounds 30] [--epsilons 8 2]

For each fleet size: FedAvg without DP, then dp-fedavg calibrated to each target epsilon
(delta 1e-5, clip 1.0, over the planned rounds); digits IID, every device every round,
fp32 deltas. Prints a markdown table and writes runs/bench/dp/results.json.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from simulation.fleet import SimConfig, simulate


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, nargs="+", default=[10, 100])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 2.0])
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--out", type=Path, default=Path("runs/bench/dp"))
    a = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    rows = []
    for n in a.devices:
        row: dict[str, object] = {"devices": n}
        base = dict(
            devices=n,
            rounds=a.rounds,
            partition="iid",
            codec="fp32",
            seed=0,
            min_devices=n,
            round_timeout=120.0,
        )
        s = simulate(SimConfig(out=a.out / f"n{n}-nodp", **base), say=lambda _m: None)
        row["fedavg"] = s["final_accuracy"]
        for eps in a.epsilons:
            opts = (
                ("clip_norm", str(a.clip)),
                ("target_epsilon", str(eps)),
                ("rounds", str(a.rounds)),
                ("delta", "1e-5"),
            )
            s = simulate(
                SimConfig(
                    out=a.out / f"n{n}-eps{eps:g}", strategy="dp-fedavg", strategy_opts=opts, **base
                ),
                say=lambda _m: None,
            )
            row[f"eps{eps:g}"] = s["final_accuracy"]
            row[f"eps{eps:g}_spent"] = s["dp_epsilon"]
        rows.append(row)
        print(row, flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(rows, indent=1))
    head = "| devices | FedAvg | " + " | ".join(f"DP-FedAvg ε={e:g} (spent)" for e in a.epsilons)
    print(head + " |\n|" + "---|" * (2 + len(a.epsilons)))
    for r in rows:
        cells = [f"{r['fedavg']:.3f}"] + [
            f"{r[f'eps{e:g}']:.3f} ({r[f'eps{e:g}_spent']:.2f})" for e in a.epsilons
        ]
        print(f"| {r['devices']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
