"""Federated pruning: accuracy against sparsity, serving model size and latency, bytes (issue 18).

Every run is ``simulation.fleet.simulate`` over its own loopback Mosquitto. Per (dataset, spec,
seed): final central accuracy, sparsity, the serving ONNX (structured units removed) in bytes,
onnxruntime latency of the serving model at batch 1 and 64 (fp32; the int8 twin too with
``--int8``), and uplink / downlink bytes per round.

    .venv/bin/python bench/pruning/run.py [--dataset digits|imu] [--seeds 0,1,2]
        [--specs none,structured:0.5,unstructured:0.75,...] [--rounds 30] [--int8] [--out DIR]

Writes ``OUT/results.json`` and ``OUT/results.md`` (the table, with the command that made it).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from simulation.fleet import SimConfig, simulate  # noqa: E402

SPECS = [
    "none",
    "structured:0.5",
    "structured:0.75",
    "structured:0.9",
    "unstructured:0.5",
    "unstructured:0.75",
    "unstructured:0.9",
]
DATASETS = {
    "digits": {"devices": 10, "partition": "dirichlet:0.5", "epochs": 5, "lr": 0.1},
    "imu": {"devices": 10, "partition": "iid", "epochs": 2, "lr": 0.05},
}


def latency_us(onnx_path: Path, input_dim: int, batch: int, reps: int = 200) -> float:
    """Median onnxruntime latency (µs) of one call at ``batch``, one intra-op thread."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(batch, input_dim)).astype(np.float32)
    for _ in range(20):
        sess.run(None, {"input": x})
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sess.run(None, {"input": x})
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def one_run(args: argparse.Namespace, spec: str, seed: int) -> dict[str, Any]:
    d = DATASETS[args.dataset]
    out = args.out / "runs" / f"{spec.replace(':', '_')}-{seed}"
    cfg = SimConfig(
        out=out, dataset=args.dataset, rounds=args.rounds, seed=seed, int8=args.int8,
        prune=None if spec == "none" else spec, **d,  # type: ignore[arg-type]
    )  # fmt: skip
    simulate(cfg, say=lambda _s: None)
    return measure(out, args.dataset, spec, seed)


def measure(out: Path, dataset: str, spec: str, seed: int) -> dict[str, Any]:
    """One finished run's row, from its summary.json and model files."""
    import zstandard

    s = json.loads((out / "summary.json").read_text())
    models = out / "aggregator" / "models"
    version = s["rounds"]
    serving = models / f"v{version:06d}.serving.onnx"
    if not serving.exists():
        serving = models / f"v{version:06d}.onnx"
    dim = 64 if dataset == "digits" else 384
    row = {
        "spec": spec,
        "seed": seed,
        "accuracy": s["final_accuracy"],
        "sparsity": s["sparsity"],
        "model_bytes": s["model_bytes"],
        # What a download of the file costs compressed: pruned zeros compress, dense weights not.
        "model_zstd_bytes": len(zstandard.ZstdCompressor(level=19).compress(serving.read_bytes())),
        "up_per_round": s["uplink_bytes"] / version,
        "down_per_round": s["downlink_bytes"] / version,
        "lat1_us": latency_us(serving, dim, 1),
        "lat64_us": latency_us(serving, dim, 64),
    }
    twin = serving.with_suffix(".int8.onnx")
    if not twin.exists():  # unstructured: the serving model is the training one
        twin = models / f"v{version:06d}.int8.onnx"
    if twin.exists():
        row["int8_bytes"] = twin.stat().st_size
        row["int8_lat1_us"] = latency_us(twin, dim, 1)
        row["int8_lat64_us"] = latency_us(twin, dim, 64)
    return row


def table(rows: list[dict[str, Any]], command: str) -> str:
    lines = [
        f"`{command}` on {platform.machine()} ({platform.python_version()}), mean over seeds:",
        "",
        "| spec | accuracy | sparsity | serving ONNX B | zstd B | lat b1 µs | lat b64 µs "
        "| int8 B | int8 b1 µs | int8 b64 µs | up B/round | down B/round |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for spec in dict.fromkeys(r["spec"] for r in rows):
        rs = [r for r in rows if r["spec"] == spec]

        def m(key: str, rs: list[dict[str, Any]] = rs) -> float:
            return statistics.mean(r[key] for r in rs)

        def opt(key: str, fmt: str, rs: list[dict[str, Any]] = rs) -> str:
            have = [r[key] for r in rs if key in r]
            return format(statistics.mean(have), fmt) if len(have) == len(rs) else "n/a"

        lines.append(
            f"| {spec} | {m('accuracy'):.4f} ± {statistics.pstdev(r['accuracy'] for r in rs):.4f} "
            f"| {m('sparsity'):.2f} | {m('model_bytes'):,.0f} | {opt('model_zstd_bytes', ',.0f')} "
            f"| {m('lat1_us'):.1f} | {m('lat64_us'):.1f} | {opt('int8_bytes', ',.0f')} "
            f"| {opt('int8_lat1_us', '.1f')} | {opt('int8_lat64_us', '.1f')} "
            f"| {m('up_per_round'):,.0f} | {m('down_per_round'):,.0f} |"
        )
    dense = [r["accuracy"] for r in rows if r["spec"] == "none"]
    if dense:
        base = statistics.mean(dense)
        lines.append("")
        for kind in ("structured", "unstructured"):
            ok = [
                statistics.mean(r["sparsity"] for r in rows if r["spec"] == spec)
                for spec in dict.fromkeys(r["spec"] for r in rows)
                if spec.startswith(kind + ":")
                and base - statistics.mean(r["accuracy"] for r in rows if r["spec"] == spec) <= 0.01
            ]
            best = f"{max(ok):.2f}" if ok else "none of those run"
            lines.append(f"Highest {kind} sparsity within 1 pp of dense ({base:.4f}): {best}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=sorted(DATASETS), default="digits")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--specs", default=",".join(SPECS))
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--int8", action="store_true", help="build the int8 twin (devices calibrate)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "pruning" / "results")
    p.add_argument(
        "--measure-only",
        action="store_true",
        help="do not simulate: measure the finished runs in OUT/runs again",
    )
    args = p.parse_args()
    rows = []
    for spec in args.specs.split(","):
        for seed in args.seeds.split(","):
            if args.measure_only:
                run = args.out / "runs" / f"{spec.replace(':', '_')}-{seed}"
                rows.append(measure(run, args.dataset, spec, int(seed)))
            else:
                rows.append(one_run(args, spec, int(seed)))
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python bench/pruning/run.py " + shlex.join(sys.argv[1:])
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "results.md").write_text(table(rows, command))
    print(table(rows, command))


if __name__ == "__main__":
    main()
