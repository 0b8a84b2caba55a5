"""Sharded aggregation demo (issue 7): K shard-worker processes on one Mosquitto.

For each K, a fresh local Mosquitto with ``broker_config/acl.sharded``; K worker processes
(``python -m aggregator.sharded.service``, what ``fedge shard-worker`` runs); in this process
the reducer (username ``aggregator``) and D hand-driven devices, each its own MQTT session.
The reducer publishes a model (hand-built ONNX MLP, no torch) and a round task; every device
publishes one update (fixed seeds, the same bytes for every K); the reducer asks the workers
for their partial sums until all D are counted and applies FedAvg. Reported per K: seconds
from the first device publish to the merged sum, updates per worker, the workers' CPU
seconds, and the largest difference of the new model from K=1's and from numpy's FedAvg.

    .venv/bin/python bench/scale/sharded_demo.py [--workers 1,2,4] [--devices 200]
        [--codec fp32] [--hidden 256] [--state-root DIR] [--broker-config local|scale]
        [--out runs/bench/sharded]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from aggregator.sharded.service import ReducerSession  # noqa: E402
from fedge.codecs import parse_codec  # noqa: E402
from fedge.envelopes import GlobalModel, ModelArch, ModelUpdate, RoundTask, TrainHyper  # noqa: E402
from fedge.limits import DEFAULT_LIMITS  # noqa: E402
from fedge.topics import Topics  # noqa: E402
from fedge.transport.mux import Mux  # noqa: E402
from fedge.transport.session import Session, SessionOptions  # noqa: E402
from simulation.broker import CONFIG_DIR, MosquittoBroker  # noqa: E402

WAIT = 120.0


def make_inputs(devices: int, hidden: int, codec_name: str) -> dict[str, object]:
    shapes = {
        "fc1.weight": (hidden, 64),
        "fc1.bias": (hidden,),
        "fc2.weight": (10, hidden),
        "fc2.bias": (10,),
    }
    rng = np.random.default_rng(0)
    weights = {k: rng.normal(0, 0.3, s).astype(np.float32) for k, s in shapes.items()}
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["input", "fc1.weight", "fc1.bias"], ["h"], transB=1),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Gemm", ["r", "fc2.weight", "fc2.bias"], ["logits"], transB=1),
        ],
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx_bytes = model.SerializeToString()
    gm = GlobalModel(
        1, ModelArch("mlp", 64, 10), onnx_bytes, hashlib.sha256(onnx_bytes).hexdigest(), 1.0
    )
    task = RoundTask(1, 1, time.time() + 3600, codec_name, TrainHyper(), bytes(16))
    codec = parse_codec(codec_name)
    payloads, deltas, samples = {}, [], []
    for i in range(devices):
        d = f"dev-{i:04d}"
        drng = np.random.default_rng(1000 + i)
        delta = {k: drng.normal(0, 0.01, s).astype(np.float32) for k, s in shapes.items()}
        blob = codec.encode(delta, rng=np.random.default_rng(i))
        n = 20 + i % 50
        payloads[d] = ModelUpdate(d, 1, 1, f"{d}-u", task.nonce, n, codec_name, blob).to_bytes()
        deltas.append(codec.decode(blob, shapes, DEFAULT_LIMITS))
        samples.append(n)
    expected = {
        k: weights[k]
        + np.average(np.stack([d[k] for d in deltas]).astype(np.float64), axis=0, weights=samples)
        for k in shapes
    }
    return {
        "shapes": shapes,
        "weights": weights,
        "model": gm,
        "task": task,
        "payloads": payloads,
        "expected": expected,
    }


def run_k(
    k: int, inputs: dict[str, object], work: Path, state: Path, template: Path
) -> dict[str, object]:
    shapes, task, payloads = inputs["shapes"], inputs["task"], inputs["payloads"]
    assert isinstance(task, RoundTask)
    assert isinstance(payloads, dict)
    assert isinstance(shapes, dict)
    fleet = f"demo{uuid.uuid4().hex[:6]}"
    topics = Topics(fleet)
    names = [f"aggregator-{j}" for j in range(k)]
    acl = CONFIG_DIR / "acl.sharded"
    with MosquittoBroker(work / f"broker-{k}", template=template, acl=acl) as broker:
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "aggregator.sharded.service", "--broker", broker.url,
                 "--fleet", fleet, "--worker", name, "--state-dir", str(state / fleet / name),
                 "--log-level", "WARNING"],
                cwd=ROOT,
            )
            for name in names
        ]  # fmt: skip
        mux = Mux("demo").start()
        reducer = ReducerSession(mux, broker.url, fleet, names).start(WAIT)
        try:
            reducer.publish(topics.model, inputs["model"].to_bytes(), retain=True)  # type: ignore[attr-defined]
            reducer.publish(topics.task, task.to_bytes(), retain=True)
            # Every worker answers once it holds the model and the task: then it is subscribed.
            reducer.collect(task.round, task.base_version, shapes, timeout=WAIT)
            sessions = {
                d: Session(
                    mux,
                    reducer.session.url,
                    SessionOptions(d, d, session_expiry=0),
                    [],
                    lambda t, p: None,
                )
                for d in payloads
            }
            for s in sessions.values():
                s.start()
            deadline = time.monotonic() + WAIT
            while not all(s.connected for s in sessions.values()) and time.monotonic() < deadline:
                time.sleep(0.05)
            acked = threading.Semaphore(0)
            workers = [psutil.Process(p.pid) for p in procs]
            cpu0 = sum(sum(w.cpu_times()[:2]) for w in workers)
            mosq = psutil.Process(broker.pid)
            bcpu0 = sum(mosq.cpu_times()[:2])
            t0 = time.perf_counter()
            for d, payload in payloads.items():
                mux.call_soon(
                    lambda d=d, payload=payload: sessions[d].publish(
                        topics.update(d), payload, on_done=lambda ok, r: acked.release()
                    )
                )
            for _ in payloads:
                if not acked.acquire(timeout=WAIT):
                    raise TimeoutError("device publishes not acknowledged")
            t_acked = time.perf_counter() - t0
            merged = reducer.collect(
                task.round,
                task.base_version,
                shapes,
                min_count=len(payloads),
                timeout=WAIT,
                poll=0.05,
            )
            seconds = time.perf_counter() - t0
            cpu = sum(sum(w.cpu_times()[:2]) for w in workers) - cpu0
            broker_cpu = sum(mosq.cpu_times()[:2]) - bcpu0
            for s in sessions.values():
                mux.call_soon(s.close)
        finally:
            reducer.close()
            time.sleep(0.2)
            mux.stop()
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(10)
    new = merged.fedavg(inputs["weights"], 1.0)  # type: ignore[arg-type]
    return {
        "workers": k,
        "devices": len(payloads),
        "seconds_to_merged": round(seconds, 3),
        "seconds_to_all_acked": round(t_acked, 3),
        "per_worker": merged.per_worker,
        "worker_cpu_seconds": round(cpu, 2),
        "broker_cpu_seconds": round(broker_cpu, 2),
        "counted": merged.count,
        "new": new,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", default="1,2,4")
    p.add_argument("--devices", type=int, default=200)
    p.add_argument("--codec", default="fp32")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument(
        "--state-root",
        type=Path,
        default=None,
        help="where workers keep their journals (default: a temp dir; /dev/shm: fsync ~free)",
    )
    p.add_argument(
        "--broker-config",
        choices=("local", "scale"),
        default="local",
        help="broker_config/<name>.conf.template: local saves on every change, scale every 60 s",
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    template = CONFIG_DIR / f"{args.broker_config}.conf.template"
    inputs = make_inputs(args.devices, args.hidden, args.codec)
    expected = inputs["expected"]
    assert isinstance(expected, dict)
    results, first = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for k in (int(x) for x in args.workers.split(",")):
            r = run_k(k, inputs, Path(tmp), args.state_root or Path(tmp), template)
            new = r.pop("new")
            first = first or new
            r["max_abs_diff_vs_first"] = float(max(np.abs(new[n] - first[n]).max() for n in new))
            r["max_abs_diff_vs_numpy"] = float(max(np.abs(new[n] - expected[n]).max() for n in new))
            results.append(r)
            print(json.dumps(r), flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
