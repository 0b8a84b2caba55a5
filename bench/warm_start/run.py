"""Warm start against cold start over the real broker (issue 14: ``model.init``).

    PYTHONPATH=. .venv/bin/python bench/warm_start/run.py [--rounds 20] [--pretrain-rounds 20]

One digits split (10 devices, Dirichlet 0.5, seed 0, the same held-out test split for every
fleet). A first fleet of devices 0-4 trains ``--pretrain-rounds`` rounds; its final version is
the warm start of a second fleet of devices 5-9 (data the first never saw), run twice for
``--rounds`` rounds: cold (seeded initial model) and warm (``model.init``). Reports the cold
fleet's final accuracy and the first round at which each fleet reaches it. Writes
runs/bench/warm_start/results.json.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import simulation.fleet as fleet_module
from simulation.datasets import make_federated
from simulation.fleet import SimConfig, simulate


def run(out: Path, part: slice, rounds: int, init: Path | None) -> list[float]:
    full = make_federated("digits", 10, "dirichlet:0.5", seed=0)
    half = replace(full, parts=full.parts[part])
    original = fleet_module.make_federated
    fleet_module.make_federated = lambda *_a, **_k: half  # type: ignore[assignment]
    try:
        cfg = SimConfig(
            out=out, devices=len(half.parts), rounds=rounds, partition="dirichlet:0.5",
            seed=0, epochs=2, init=init, min_devices=len(half.parts), round_timeout=120.0,
        )  # fmt: skip
        simulate(cfg, say=lambda _line: None)
    finally:
        fleet_module.make_federated = original  # type: ignore[assignment]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [float(r["accuracy"]) for r in records if "version" in r]


def first_reaching(curve: list[float], target: float) -> int | None:
    return next((i + 1 for i, acc in enumerate(curve) if acc >= target), None)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--pretrain-rounds", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("runs/bench/warm_start"))
    a = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    pre = run(a.out / "pretrain", slice(0, 5), a.pretrain_rounds, None)
    init = (
        a.out / "pretrain" / "aggregator" / "models" / f"v{a.pretrain_rounds:06d}.onnx"
    ).resolve()
    cold = run(a.out / "cold", slice(5, 10), a.rounds, None)
    warm = run(a.out / "warm", slice(5, 10), a.rounds, init)
    target = cold[-1]
    result: dict[str, Any] = {
        "pretrain_final_accuracy": pre[-1],
        "cold_final_accuracy": target,
        "cold_rounds_to_target": first_reaching(cold, target),
        "warm_rounds_to_target": first_reaching(warm, target),
        "warm_final_accuracy": warm[-1],
        "cold_curve": cold,
        "warm_curve": warm,
        "rounds": a.rounds,
        "pretrain_rounds": a.pretrain_rounds,
    }
    (a.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    print("| fleet (devices 5-9) | rounds to the cold fleet's final accuracy | final accuracy |")
    print("|---|---|---|")
    print(f"| cold start | {result['cold_rounds_to_target']} | {target:.4f} |")
    print(
        f"| warm start (devices 0-4, {a.pretrain_rounds} rounds) | "
        f"{result['warm_rounds_to_target']} | {warm[-1]:.4f} |"
    )


if __name__ == "__main__":
    main()
