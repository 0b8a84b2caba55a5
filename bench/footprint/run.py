"""Peak memory (RSS) of a device's fedge processes: inference, an idle agent, a training agent.

Each case is a real ``fedge`` process started from this checkout; its peak RSS is the
kernel's ``ru_maxrss`` for that process alone (``os.wait4``), so nothing in this script's own
process counts. The agents talk to a Mosquitto of their own on loopback.

- ``predict``: ``fedge agent predict --model model.onnx --input samples.csv`` (360 digits
  samples, the zoo's 64-64-10 ``mlp``); onnxruntime only.
- ``agent idle``: ``fedge agent --config`` connected, holding the current model, with no
  aggregator in its fleet (what a device does between rounds), for ``--idle-seconds``.
- ``agent training``: the same agent in a fleet whose aggregator (another process, not
  measured) runs ``--rounds`` rounds of 5 local epochs; stopped after the last version.

    .venv/bin/python bench/footprint/run.py [--rounds 3] [--idle-seconds 5] [--out DIR]

Writes ``OUT/results.json`` and prints the table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from simulation.broker import MosquittoBroker  # noqa: E402

FEDGE = [sys.executable, "-m", "fedge_cli.main"]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def setup(tmp: Path) -> None:
    """The data split, the ONNX model and the CSV; run in a child process (``--setup``)."""
    import numpy as np

    from models.onnx_export import OnnxTemplate
    from models.torch_state import to_numpy_state
    from models.zoo import build_model
    from simulation.datasets import make_federated, write_npz_partitions

    data = make_federated("digits", 1, "iid", seed=0)
    write_npz_partitions(data, tmp / "data")
    onnx = OnnxTemplate("mlp", 64, 10).render(to_numpy_state(build_model("mlp", 64, 10)))
    (tmp / "model.onnx").write_bytes(onnx)
    np.savetxt(tmp / "samples.csv", data.test[0], delimiter=",", fmt="%.4f")


def peak_rss(cmd: list[str], log: Path, stop_when: Callable[[], bool], timeout: float) -> dict:
    """Run ``cmd`` until it exits or ``stop_when()`` (then SIGTERM); its peak RSS in MiB.

    A child's ``ru_maxrss`` starts from its parent's RSS at fork and survives ``exec``: this
    process imports neither torch nor numpy (``setup`` runs apart), so that floor is ~15 MiB,
    printed as ``parent``."""
    t0 = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=ENV, stdout=out, stderr=subprocess.STDOUT)
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if stop_when() or time.monotonic() - t0 > timeout:
            os.kill(proc.pid, signal.SIGTERM)
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.1)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    return {
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
        "seconds": round(time.monotonic() - t0, 1),
        "exit": proc.returncode,
        "command": " ".join(cmd[2:]).replace("fedge_cli.main", "fedge"),
    }


def agent_config(path: Path, broker: str, fleet: str, data: Path, state: Path) -> Path:
    path.write_text(
        yaml.safe_dump(
            {"device_id": "dev-0", "broker": broker, "fleet": fleet, "data": str(data),
             "state_dir": str(state)}
        )
    )  # fmt: skip
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--idle-seconds", type=float, default=5.0)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-footprint")
    ap.add_argument("--setup", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.setup is not None:
        setup(args.setup)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        subprocess.run([sys.executable, __file__, "--setup", str(tmp)], env=ENV, check=True)

        results["predict"] = peak_rss(
            [*FEDGE, "agent", "predict", "--model", str(tmp / "model.onnx"),
             "--input", str(tmp / "samples.csv")],
            args.out / "predict.log", lambda: False, 120,
        )  # fmt: skip

        with MosquittoBroker(tmp / "broker") as broker:
            # The training fleet first: the idle agent then holds its published model.
            agg_state = tmp / "aggregator"
            (tmp / "aggregator.yaml").write_text(
                yaml.safe_dump(
                    {"broker": broker.url, "fleet": "train", "state_dir": str(agg_state),
                     "rounds": args.rounds, "target_devices": 1, "min_devices": 1,
                     "round_timeout": 60, "hyper": {"epochs": 5}}
                )
            )  # fmt: skip
            agg = subprocess.Popen(
                [*FEDGE, "aggregator", "--config", str(tmp / "aggregator.yaml"),
                 "--log-level", "WARNING"],
                env=ENV, stdout=subprocess.DEVNULL, stderr=(args.out / "aggregator.log").open("wb"),
            )  # fmt: skip
            state = tmp / "agent"
            cfg = agent_config(tmp / "a.yaml", broker.url, "train", tmp / "data", state)

            def trained_all() -> bool:
                held = state / "model.json"
                return held.is_file() and json.loads(held.read_text())["version"] >= args.rounds

            results["agent training"] = peak_rss(
                [*FEDGE, "agent", "--config", str(cfg), "--log-level", "WARNING"],
                args.out / "agent-training.log", trained_all, 300,
            )  # fmt: skip
            results["agent training"]["rounds"] = args.rounds
            agg.wait(60)

            idle_cfg = agent_config(tmp / "i.yaml", broker.url, "idle", tmp / "data", state)
            start = time.monotonic()
            results["agent idle"] = peak_rss(
                [*FEDGE, "agent", "--config", str(idle_cfg), "--log-level", "WARNING"],
                args.out / "agent-idle.log",
                lambda: time.monotonic() - start > args.idle_seconds, 60,
            )  # fmt: skip

    parent = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    results["parent"] = {"peak_rss_mib": parent, "seconds": 0.0, "command": "this script"}
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("| process | peak RSS (MiB) | wall (s) |\n|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['peak_rss_mib']} | {r['seconds']} |")
    print(f"\nresults: {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
