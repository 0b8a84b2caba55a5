"""Fine-tuning only the last layer against full fine-tuning, over the real broker (issue 14:
``model.trainable``).

    PYTHONPATH=. .venv/bin/python bench/finetune/run.py [--rounds 20] [--pretrain-rounds 20]

One digits split (10 devices, Dirichlet 0.5, seed 0, one held-out test split for every fleet),
the zoo's MLP. Devices 0-4 train ``--pretrain-rounds`` rounds from the seeded model; their
final version is ``model.init`` of a fleet of devices 5-9 (data the first fleet never saw),
which fine-tunes it ``--rounds`` rounds: every tensor (full) or ``fc3.*`` only (last layer),
with each codec of ``--codecs`` (default: the simulation's default codec, the dense default
and fp32). Reports,
per run, the bytes of one update on the wire (the MQTT packets the aggregator received,
``uplink_bytes`` over updates counted, averaged over rounds), its ratio to full fine-tuning
with the same codec, and the central accuracy after the last round. Writes
``--out``/results.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import simulation.fleet as fleet_module
from aggregator.config import DENSE_CODEC
from simulation import DEFAULT_SIM_CODEC
from simulation.datasets import make_federated
from simulation.fleet import SimConfig, simulate

LAST_LAYER = ("fc3.*",)


def run(
    out: Path,
    part: slice,
    rounds: int,
    *,
    codec: str,
    init: Path | None = None,
    trainable: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    full = make_federated("digits", 10, "dirichlet:0.5", seed=0)
    half = replace(full, parts=full.parts[part])
    original = fleet_module.make_federated
    fleet_module.make_federated = lambda *_a, **_k: half  # type: ignore[assignment]
    try:
        cfg = SimConfig(
            out=out, devices=len(half.parts), rounds=rounds, partition="dirichlet:0.5",
            seed=0, epochs=2, init=init, trainable=trainable, codec=codec, model="mlp",
            min_devices=len(half.parts), round_timeout=120.0,
        )  # fmt: skip
        simulate(cfg, say=lambda _line: None)
    finally:
        fleet_module.make_federated = original  # type: ignore[assignment]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ok = [r for r in records if "version" in r]
    per_update = [r["uplink_bytes"] / len(r["counted"]) for r in ok if r.get("counted")]
    return {
        "codec": codec,
        "trainable": list(trainable) if trainable else None,
        "bytes_per_update": sum(per_update) / len(per_update),
        "final_accuracy": float(ok[-1]["accuracy"]),
        "curve": [float(r["accuracy"]) for r in ok],
    }


def envelope_bytes(codec: str) -> int:
    """The bytes of an update that are not its delta: a device's envelope as the simulation
    sends it (device id, round, ids, nonce, counts, codec, four training metrics, an Ed25519
    signature) with an empty delta, in its MQTT packet. Fine-tuning shrinks only the delta;
    this part stays."""
    import uuid

    from fedge.envelopes import ModelUpdate
    from fedge.topics import Topics
    from fedge.transport.mqtt import publish_packet_size

    metrics = {"loss": 0.5, "accuracy": 0.9, "seconds": 0.1, "epochs": 2.0}
    upd = ModelUpdate(
        device="dev-0005", round=20, base_version=19, update_id=uuid.uuid4().hex,
        nonce=bytes(16), num_samples=172, codec=codec, delta=b"", metrics=metrics,
        signature=bytes(64),
    )  # fmt: skip
    return publish_packet_size(Topics("sim-0123abcd").update("dev-0005"), len(upd.to_bytes()))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--pretrain-rounds", type=int, default=20)
    p.add_argument("--codecs", default=f"{DEFAULT_SIM_CODEC},{DENSE_CODEC},fp32")
    p.add_argument("--out", type=Path, default=Path("runs/bench/finetune"))
    a = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    t0 = time.monotonic()
    pre = run(a.out / "pretrain", slice(0, 5), a.pretrain_rounds, codec=DEFAULT_SIM_CODEC)
    init = (
        a.out / "pretrain" / "aggregator" / "models" / f"v{a.pretrain_rounds:06d}.onnx"
    ).resolve()
    runs: list[dict[str, Any]] = []
    for i, codec in enumerate(a.codecs.split(",")):
        for name, trainable in (("full", None), ("last", LAST_LAYER)):
            r = run(a.out / f"{name}-{i}", slice(5, 10), a.rounds, codec=codec, init=init,
                    trainable=trainable)  # fmt: skip
            runs.append({"fine_tune": name, **r, "envelope_bytes": envelope_bytes(codec)})
    for r in runs:
        same = next(x for x in runs if x["codec"] == r["codec"] and x["fine_tune"] == "full")
        r["ratio_to_full"] = r["bytes_per_update"] / same["bytes_per_update"]
    result = {
        "pretrain_final_accuracy": pre["final_accuracy"],
        "rounds": a.rounds,
        "pretrain_rounds": a.pretrain_rounds,
        "seconds": round(time.monotonic() - t0, 1),
        "runs": runs,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"warm start: devices 0-4 after {a.pretrain_rounds} rounds, accuracy "
          f"{pre['final_accuracy']:.4f}")  # fmt: skip
    print(
        f"| codec | fine-tune | bytes per update | of which envelope | of full | "
        f"accuracy after {a.rounds} rounds |"
    )
    print("|---|---|---|---|---|---|")
    for r in runs:
        what = "every tensor" if r["fine_tune"] == "full" else "`fc3.*` only"
        print(
            f"| `{r['codec']}` | {what} | {r['bytes_per_update']:,.0f} | "
            f"{r['envelope_bytes']:,} | {r['ratio_to_full']:.3f} | {r['final_accuracy']:.4f} |"
        )


if __name__ == "__main__":
    main()
