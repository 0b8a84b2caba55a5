"""Does compressing a site's partial at its gateway, with error feedback, pay off? (issue 16)

A replay of the hierarchy's arithmetic, in process and without brokers (the wire and the
bridges are measured by ``run.py``): every device trains with ``edge_agent.trainer.train_local``
from the global model of its own run and sends its fp32 delta; each site's gateway folds its
devices' deltas into the weighted mean ``m_s`` (what ``PartialSum.sums / total_weight`` holds)
and sends either

- ``dense``: ``m_s`` as fp32 (what the gateways send today), or
- a codec of ``fedge.codecs`` with a per-site error-feedback residual
  (``edge_agent.residual.Residual``: ``target = m_s + r``, ``sent = decode(encode(target))``,
  ``r = target - sent``), the device uplink's logic run at the gateway;

and the centre steps ``w += sum_s W_s sent_s / sum_s W_s``. ``flat`` is the same fleet without
sites (``w += sum_i n_i d_i / sum_i n_i``). Measured per codec: final test accuracy (and
against flat, per seed), max |w - w_flat|, the bytes of one site's partial (a ``PartialSum``
with the sums; compressed: the codec blob plus a summary ``PartialSum`` with no sums, i.e. what
a compressed partial would weigh with the counted ids and the envelope).

    .venv/bin/python bench/hierarchy/partial_codecs.py [--devices 24] [--sites 2] \\
        [--rounds 20] [--epochs 5] [--seeds 0,1,2] [--codecs fp16,topk:0.1+int8+zstd,...] \\
        [--out bench/hierarchy/results/partial_codecs.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.sharded.partials import PartialSum
from edge_agent.residual import Residual
from edge_agent.trainer import train_local
from fedge.codecs import parse_codec
from fedge.envelopes import ModelArch, TrainHyper
from fedge.limits import DEFAULT_LIMITS
from fedge.tensors import spec_of
from models.torch_state import to_numpy_state
from models.zoo import build_model
from simulation.datasets import FederatedData, make_federated

Weights = dict[str, np.ndarray]


def _accuracy(arch: ModelArch, w: Weights, data: FederatedData) -> float:
    import torch

    from models.torch_state import load_numpy_state

    model = build_model(arch.name, arch.input_dim, arch.num_classes)
    load_numpy_state(model, w)
    model.eval()
    x, y = data.test
    with torch.no_grad():
        pred = model(torch.from_numpy(np.asarray(x, np.float32))).argmax(1).numpy()
    return float((pred == y).mean())


def _partial_bytes(sums: Weights, devices: int, blob: bytes | None) -> int:
    p = PartialSum(
        round=1,
        base_version=0,
        worker="gw-s0",
        request=1,
        total_weight=float(devices),
        counted={f"dev-{i:04d}": f"{i:032x}" for i in range(devices)},
        sums={k: np.asarray(v, np.float32) for k, v in sums.items()} if blob is None else {},
    )
    return len(p.to_bytes()) + (0 if blob is None else len(blob))


def _run(
    data: FederatedData, arch: ModelArch, args: argparse.Namespace, seed: int, codec: str
) -> dict[str, Any]:
    """One fleet for ``args.rounds`` rounds; ``codec``: flat, dense, or a partial codec."""
    w = {k: v.astype(np.float32) for k, v in to_numpy_state(build_model(
        arch.name, arch.input_dim, arch.num_classes, seed=seed)).items()}  # fmt: skip
    hyper = TrainHyper(epochs=args.epochs, batch_size=32, lr=args.lr)
    sites = 1 if codec == "flat" else args.sites
    lossy = codec not in ("flat", "dense")
    c = parse_codec(codec) if lossy else None
    residuals = [Residual() for _ in range(sites)]
    rng = np.random.default_rng(seed)
    sizes: list[int] = []
    for r in range(args.rounds):
        sums: list[Weights] = [{k: np.zeros_like(v, np.float64) for k, v in w.items()}
                               for _ in range(sites)]  # fmt: skip
        weight = [0.0] * sites
        for i, (x, y) in enumerate(data.parts):
            res = train_local(arch, w, x, y, hyper, seed=seed * 100_003 + r * 1_009 + i)
            s = i % sites
            for k in w:
                sums[s][k] += (res.weights[k] - w[k]).astype(np.float64) * res.num_samples
            weight[s] += res.num_samples
        total = sum(weight)
        step = {k: np.zeros_like(v, np.float64) for k, v in w.items()}
        for s in range(sites):
            mean = {k: (v / weight[s]).astype(np.float32) for k, v in sums[s].items()}
            if c is None:
                sent, blob = mean, None
            else:
                target = residuals[s].apply(mean)
                blob = c.encode(target, rng)
                sent = c.decode(blob, spec_of(target), DEFAULT_LIMITS)
                residuals[s].update(target, sent)
            if r == 0:
                sizes.append(_partial_bytes(mean, len(data.parts) // sites, blob))
            for k in w:
                step[k] += sent[k].astype(np.float64) * weight[s]
        w = {k: (w[k] + step[k] / total).astype(np.float32) for k in w}
    return {"weights": w, "accuracy": _accuracy(arch, w, data), "partial_bytes": sizes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=24)
    ap.add_argument("--sites", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--partition", default="dirichlet:0.5")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--codecs", default="fp16,topk:0.1+int8+zstd,topk:0.03+int4+zstd")
    ap.add_argument("--out", type=Path, default=Path("bench/hierarchy/results/partial_codecs.json"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)  # small models: one thread is several times faster here
    variants = ["flat", "dense", *args.codecs.split(",")]
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    t0 = time.perf_counter()
    for seed in (int(s) for s in args.seeds.split(",")):
        data = make_federated("digits", args.devices, args.partition, seed)
        arch = ModelArch("mlp", data.input_dim, data.num_classes)
        flat: Weights | None = None
        for v in variants:
            out = _run(data, arch, args, seed, v)
            if flat is None:
                flat = out["weights"]
            diff = max(float(np.max(np.abs(out["weights"][k] - flat[k]))) for k in flat)
            runs[v].append(
                {
                    "seed": seed,
                    "accuracy": out["accuracy"],
                    "max_abs_diff_vs_flat": diff,
                    "partial_bytes": out["partial_bytes"],
                }
            )
            print(json.dumps({"variant": v, **runs[v][-1]}), flush=True)
    rows = []
    for v in variants:
        accs = [x["accuracy"] for x in runs[v]]
        deltas = [x["accuracy"] - f["accuracy"] for x, f in zip(runs[v], runs["flat"], strict=True)]
        sizes = [b for x in runs[v] for b in x["partial_bytes"]]
        rows.append(
            {
                "variant": v,
                "accuracy": statistics.mean(accs),
                "delta_pp_vs_flat": 100 * statistics.mean(deltas),
                "worst_delta_pp": 100 * min(deltas),
                "max_abs_diff_vs_flat": max(x["max_abs_diff_vs_flat"] for x in runs[v]),
                "partial_bytes": statistics.mean(sizes) if v != "flat" else None,
            }
        )
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": machine, "seconds": time.perf_counter() - t0}
    doc = {**meta, "args": vars(args) | {"out": str(args.out)}, "rows": rows, "runs": runs}
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        "| partial | accuracy | Δ vs flat (pp) | worst seed (pp) | max abs diff vs flat "
        "| bytes per site partial |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        size = "—" if r["partial_bytes"] is None else f"{r['partial_bytes']:,.0f}"
        lines.append(
            f"| {r['variant']} | {r['accuracy']:.4f} | {r['delta_pp_vs_flat']:+.2f} | "
            f"{r['worst_delta_pp']:+.2f} | {r['max_abs_diff_vs_flat']:.1e} | {size} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
