"""Hierarchy benchmark (issue 16): the same fleet flat and as 2-4 bridged sites.

Each row is one ``fedge simulate`` run (``simulation.fleet.simulate``) on the same seeded fleet
and data: flat with ``wan=True`` (every device reaches the central Mosquitto through a counted
link, ``simulation/wan.py``) or ``sites=S`` (S site Mosquittos bridged to the central one by
Mosquitto's bridge, each bridge over such a link; a gateway per site, device i at site
i mod S). Measured:

- final model: max |w_sites - w_flat| over every weight of the last ONNX (fp32 updates: float
  tolerance expected; compressed codecs: the same too, since the gateways fold the same
  decoded updates);
- WAN bytes per round, up (towards the centre) and down: TCP payload across the links, so
  every MQTT byte (headers, acks, keepalives) and no TCP/IP header;
- WAN messages per round: MQTT PUBLISH packets across the links, each way (at the central
  broker these are the messages its remote clients send and receive);
- round time: mean ``seconds`` (task to version) in ``metrics.jsonl``;
- the dense partial: bytes of one ``PartialSum`` of the model (what a site sends up per round)
  against the mean update on the wire.

    .venv/bin/python bench/hierarchy/run.py [--devices 24] [--rounds 3] [--sites 2,3,4]
        [--codecs fp32,topk:0.03+int4+zstd] [--out runs/bench/hierarchy]

Writes ``OUT/results.json`` and ``OUT/results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any

import numpy as np


def _run(out: Path, codec: str, sites: int, args: argparse.Namespace) -> dict[str, Any]:
    from simulation.fleet import SimConfig, simulate

    cfg = SimConfig(
        out=out,
        devices=args.devices,
        rounds=args.rounds,
        epochs=1,
        partition="iid",
        codec=codec,
        sites=sites,
        wan=sites == 0,
        round_timeout=60.0,
        min_devices=args.devices,
    )
    s = simulate(cfg, say=lambda _s: None)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    s["round_seconds"] = statistics.mean(r["seconds"] for r in recs if "version" in r)
    return s


def _weights(summary: dict[str, Any]) -> dict[str, np.ndarray]:
    from models.onnx_weights import read_initializers

    return read_initializers(Path(summary["model_onnx"]).read_bytes())


def _partial_bytes(weights: dict[str, np.ndarray], devices: int) -> int:
    from aggregator.sharded.partials import PartialSum

    p = PartialSum(
        round=1,
        base_version=0,
        worker="gw-s0",
        request=1,
        total_weight=float(devices),
        counted={f"dev-{i:04d}": f"{i:032x}" for i in range(devices)},
        sums={k: np.asarray(v, np.float32) for k, v in weights.items()},
    )
    return len(p.to_bytes())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sites", default="2,3,4")
    ap.add_argument("--codecs", default="fp32,topk:0.03+int4+zstd")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/hierarchy"))
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    for codec in args.codecs.split(","):
        flat = _run(args.out / codec.replace(":", "_") / "flat", codec, 0, args)
        w_flat = _weights(flat)
        per_update = flat["uplink_bytes"] / (args.devices * args.rounds)
        for n in [0, *(int(x) for x in args.sites.split(","))]:
            s = (
                flat
                if n == 0
                else _run(args.out / codec.replace(":", "_") / f"s{n}", codec, n, args)
            )
            w = _weights(s)
            wan = s["wan"]
            rows.append(
                {
                    "codec": codec,
                    "topology": "flat" if n == 0 else f"{n} sites",
                    "max_abs_diff": float(max(np.max(np.abs(w[k] - w_flat[k])) for k in w)),
                    "final_accuracy": s["final_accuracy"],
                    "wan_up_per_round": wan["bytes_up"] / args.rounds,
                    "wan_down_per_round": wan["bytes_down"] / args.rounds,
                    "wan_publish_up_per_round": wan["publish_up"] / args.rounds,
                    "wan_publish_down_per_round": wan["publish_down"] / args.rounds,
                    "round_seconds": s["round_seconds"],
                    "mean_update_bytes": per_update,
                    "dense_partial_bytes": _partial_bytes(w_flat, args.devices // max(n, 1)),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    (args.out / "results.json").write_text(
        json.dumps({"machine": machine, "args": vars(args) | {"out": str(args.out)}, "rows": rows},
                   indent=2) + "\n"
    )  # fmt: skip
    lines = [
        "| codec | topology | max abs diff vs flat | accuracy | WAN up B/round | WAN down B/round "
        "| WAN msgs up/round | WAN msgs down/round | round s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['codec']} | {r['topology']} | {r['max_abs_diff']:.1e} | "
            f"{r['final_accuracy']:.4f} | {r['wan_up_per_round']:,.0f} | "
            f"{r['wan_down_per_round']:,.0f} | {r['wan_publish_up_per_round']:.1f} | "
            f"{r['wan_publish_down_per_round']:.1f} | {r['round_seconds']:.2f} |"
        )
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
