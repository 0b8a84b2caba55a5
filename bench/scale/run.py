"""Scale benchmark (issue 7): the aggregator's memory as a process of its own, 10 vs 1,000 devices.

Per row, in a fresh directory:

- a Mosquitto started here on a free loopback port (``broker_config/scale.conf.template``,
  ``simulation.broker.MosquittoBroker``);
- the aggregator as its own OS process, the real service: ``python -m fedge_cli.main
  aggregator --config OUT/aggregator.yaml`` (what ``fedge aggregator`` runs). With
  ``--trace`` it is started through ``bench/scale/agg_trace.py`` instead, the same
  ``aggregator.cli.run`` under tracemalloc, dumping a snapshot after every round;
- N devices in this process: real ``EdgeAgent`` sessions built by
  ``simulation.fleet.build_agent`` (what ``fedge simulate`` uses), on one ``Mux`` and one
  training thread, each signing its updates with its own Ed25519 key.

Measured from outside, from ``/proc/PID/status``, polled every ``--interval`` s:

- aggregator peak RSS: ``VmHWM`` at the last poll before the process exits (the kernel's own
  high-water mark: a peak between polls is not missed, only one in the last ``--interval``);
- aggregator RSS when idle (connected, model v0 published, no device yet) and right after
  each round (when its ``round r -> vX`` line reaches stdout);
- broker peak RSS (``VmHWM``), broker CPU seconds;
- connect: from starting the first agent to every agent's session being connected;
- round time: ``seconds`` of each round in ``metrics.jsonl`` (task to version).

Task, the same at every fleet size: FedProx Synthetic(1,1) (>= 50 samples per device at any
size), model ``mlp`` 60-64-64-10 (8,714 parameters, 35 KB fp32), 1 local epoch, batch 32,
lr 0.05. The central evaluation set has a fixed size (``--eval-rows``, default 444 rows, a
seeded sample of the fleet's own hold-out; 444 is all of it at 10 devices): synthetic's test
split is the union of every device's hold-out, so it would otherwise grow with N (53,891 rows
at 1,000 devices) and its evaluation would count as aggregator memory that scales with the
fleet. ``--eval-rows 0`` keeps the whole, growing hold-out, to measure that effect.

    .venv/bin/python bench/scale/run.py [--devices 10,1000] [--rounds 5]
        [--codecs topk:0.03+int4+zstd,fp32] [--eval-rows 444] [--trace]
        [--out runs/bench/scale]

Writes ``OUT/results.json`` and ``OUT/results.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from edge_agent.model_cache import ModelCache  # noqa: E402
from fedge.topics import Topics  # noqa: E402
from fedge.transport.mqtt import BrokerURL  # noqa: E402
from fedge.transport.mux import Mux  # noqa: E402
from simulation.broker import CONFIG_DIR, MosquittoBroker  # noqa: E402
from simulation.datasets import make_federated  # noqa: E402
from simulation.fleet import build_agent  # noqa: E402
from simulation.keys import SimKeys  # noqa: E402

MiB = 2**20
DATASET, MODEL, SEED = "synthetic", "mlp", 0
HYPER = {"epochs": 1, "batch_size": 32, "lr": 0.05}
EVAL_ROWS = 444  # the whole hold-out of the 10-device fleet


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of ``pid`` in bytes ({} once it is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        return {}
    return out


class Poller(threading.Thread):
    """Samples the aggregator's and the broker's /proc status until stopped."""

    def __init__(self, agg_pid: int, broker_pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.agg_pid, self.broker_pid, self.interval = agg_pid, broker_pid, interval
        self.last_agg: dict[str, int] = {}
        self.last_broker: dict[str, int] = {}
        self.peak_agg_rss = 0
        self.timeline: list[tuple[float, int, int]] = []  # t, aggregator RSS, broker RSS
        self._halt = threading.Event()
        self.t0 = time.perf_counter()

    def run(self) -> None:
        while not self._halt.is_set():
            a, b = proc_status(self.agg_pid), proc_status(self.broker_pid)
            if a:
                self.last_agg = a
                self.peak_agg_rss = max(self.peak_agg_rss, a["VmRSS"])
            if b:
                self.last_broker = b
            self.timeline.append(
                (round(time.perf_counter() - self.t0, 3), a.get("VmRSS", 0), b.get("VmRSS", 0))
            )
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def broker_connections(broker: MosquittoBroker) -> int:
    try:
        conns = psutil.Process(broker.pid).net_connections(kind="tcp")
    except psutil.Error:
        return 0
    return sum(
        1 for c in conns if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == broker.port
    )


def eval_set(test: tuple[np.ndarray, np.ndarray], rows: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded sample of ``rows`` of the fleet's own hold-out (all of it if ``rows`` is 0)."""
    x, y = test
    if rows <= 0 or rows >= len(y):
        return x, y
    pick = np.sort(np.random.default_rng(SEED).choice(len(y), size=rows, replace=False))
    return x[pick], y[pick]


def agg_config(
    out: Path,
    url: str,
    fleet: str,
    n: int,
    codec: str,
    rounds: int,
    keys: SimKeys,
    input_dim: int,
    num_classes: int,
) -> dict[str, Any]:
    return {
        "broker": url,
        "fleet": fleet,
        "state_dir": str(out / "aggregator"),
        "metrics_file": str(out / "metrics.jsonl"),
        "model": {"name": MODEL, "input_dim": input_dim, "num_classes": num_classes, "seed": SEED},
        "hyper": HYPER,
        "codec": codec,
        "strategy": "fedavg",
        "rounds": rounds,
        "target_devices": n,
        "min_devices": max(1, n // 2),
        "round_timeout": 600.0,
        "device_keys": str(keys.registry),
        "signing_key": str(keys.aggregator_key),
        "eval_data": str(out / "eval.npz"),
    }


def one(
    out: Path, n: int, codec: str, rounds: int, eval_rows: int, interval: float, trace: bool
) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)  # as fedge simulate: one training thread for all devices
    shutil.rmtree(out, ignore_errors=True)  # a state dir left over would resume at its version
    out.mkdir(parents=True)
    data = make_federated(DATASET, n, "iid", SEED)
    ex, ey = eval_set(data.test, eval_rows)
    np.savez(out / "eval.npz", x=ex, y=ey)
    keys = SimKeys.make(out / "keys", n)
    broker = MosquittoBroker(out / "broker", template=CONFIG_DIR / "scale.conf.template").start()
    topics = Topics(f"scale-{uuid.uuid4().hex[:8]}")
    cfg = agg_config(
        out, broker.url, topics.fleet, n, codec, rounds, keys, data.input_dim, data.num_classes
    )
    (out / "aggregator.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    if trace:
        cmd = [sys.executable, str(HERE / "agg_trace.py"), "--trace-dir", str(out / "trace")]
    else:
        cmd = [sys.executable, "-m", "fedge_cli.main", "aggregator"]
    cmd += ["--config", str(out / "aggregator.yaml"), "--log-level", "WARNING"]
    stderr = (out / "aggregator.stderr").open("wb")
    agg = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True)
    poll = Poller(agg.pid, broker.pid or 0, interval)
    poll.start()
    after_round: list[dict[str, int]] = []
    lines: list[str] = []

    def read_stdout() -> None:
        assert agg.stdout is not None
        for line in agg.stdout:
            lines.append(line.rstrip())
            if line.startswith("round "):
                after_round.append(proc_status(agg.pid))
                if trace and agg.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        agg.send_signal(signal.SIGUSR1)  # agg_trace.py dumps a snapshot

    reader = threading.Thread(target=read_stdout, daemon=True)
    reader.start()
    rec: dict[str, Any] = {
        "devices": n,
        "codec": codec,
        "rounds_asked": rounds,
        "eval_rows": len(ey),
        "samples": int(sum(data.sizes)),
    }
    agents: list[Any] = []
    mux = Mux("devices").start()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="train")
    t_start = time.perf_counter()
    try:
        # Idle baseline: the aggregator connected with model v0 and round 1 published.
        while broker_connections(broker) < 1 or not (out / "aggregator" / "journal").is_dir():
            if agg.poll() is not None or time.perf_counter() - t_start > (900 if trace else 180):
                raise RuntimeError(f"aggregator did not come up; see {out}/aggregator.stderr")
            time.sleep(0.05)
        time.sleep(1.0)
        rec["agg_ready_seconds"] = round(time.perf_counter() - t_start, 2)
        rec["agg_idle"] = proc_status(agg.pid)
        if trace:
            agg.send_signal(signal.SIGUSR1)
        cache = ModelCache()
        t_conn = time.perf_counter()
        url = BrokerURL.parse(broker.url)
        for i, (x, y) in enumerate(data.parts):
            agent = build_agent(
                i,
                x,
                y,
                mux=mux,
                url=url,
                topics=topics,
                out=out,
                executor=executor,
                seed=SEED,
                keys=keys,
                model_cache=cache,
            )
            agents.append(agent)
            agent.start()
        while not all(a.session.connected for a in agents):
            if time.perf_counter() - t_conn > 300:
                break
            time.sleep(0.02)
        rec["connect_seconds"] = round(time.perf_counter() - t_conn, 2)
        try:
            agg.wait(timeout=rounds * 600 + 120)
        except subprocess.TimeoutExpired:
            agg.terminate()
            agg.wait(30)
            rec["error"] = "timeout"
        rec["wall_seconds"] = round(time.perf_counter() - t_conn, 1)
    finally:
        for a in agents:
            a.stop()
        time.sleep(0.3)
        mux.stop()
        executor.shutdown(wait=True, cancel_futures=True)
        if agg.poll() is None:
            agg.terminate()
            agg.wait(30)
        poll.stop()
        reader.join(5)
        stderr.close()
        broker_cpu = _cpu(broker.pid)
        broker.stop()
    # VmHWM of the last sample before exit; the reader also took one after every round.
    peak = max([poll.last_agg.get("VmHWM", 0)] + [s.get("VmHWM", 0) for s in after_round])
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ok = [r for r in records if "version" in r]
    rec |= {
        "returncode": agg.returncode,
        "aggregator_stdout": lines[-20:],
        "agg_peak_rss_bytes": peak,
        "agg_peak_rss_polled_bytes": poll.peak_agg_rss,
        "agg_after_round": after_round,
        "broker_peak_rss_bytes": poll.last_broker.get("VmHWM", 0),
        "broker_cpu_seconds": broker_cpu,
        "round_seconds": [round(r["seconds"], 2) for r in ok],
        "round_devices": [r["devices"] for r in ok],
        "failed_rounds": len(records) - len(ok),
        "uplink_bytes_per_round": [r["uplink_bytes"] for r in ok],
        "final_accuracy": ok[-1].get("accuracy") if ok else None,
        "rejected": [r.get("rejected") for r in records],
        "timeline": poll.timeline[:: max(1, len(poll.timeline) // 400)],
    }
    if trace:
        from agg_trace import report

        (out / "trace-report.txt").write_text(report(out / "trace") + "\n")
    if len(ok) < rounds:
        rec["error"] = rec.get("error", f"{len(ok)} of {rounds} rounds; see {out}")
    after = ", ".join(f"{s.get('VmRSS', 0) / MiB:.0f}" for s in after_round)
    print(
        f"{codec:>20} {n:5d} devices: agg peak {peak / MiB:.0f} MiB (idle "
        f"{rec['agg_idle'].get('VmRSS', 0) / MiB:.0f}; after rounds {after}) | broker "
        f"{rec['broker_peak_rss_bytes'] / MiB:.0f} MiB | connect {rec['connect_seconds']} s | "
        f"rounds {', '.join(f'{x:.1f}' for x in rec['round_seconds'])} s | "
        f"devices {rec['round_devices']} | acc {rec['final_accuracy']}",
        flush=True,
    )
    return rec


def _cpu(pid: int | None) -> float:
    try:
        t = psutil.Process(pid).cpu_times()
        return round(t.user + t.system, 2)
    except (psutil.Error, ValueError):
        return 0.0


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| codec | devices | aggregator peak RSS (MiB) | vs 10 devices | idle RSS (MiB) "
        "| RSS after each round (MiB) | broker peak RSS (MiB) | connect (s) "
        "| round times (s) | final acc. |",
        "|---|---:|---:|---:|---:|---|---:|---:|---|---:|",
    ]
    for r in rows:
        base = next((b for b in rows if b["codec"] == r["codec"] and "error" not in b), None)
        if "error" in r:
            lines.append(f"| {r['codec']} | {r['devices']} | failed: {r['error']} |" + " |" * 7)
            continue
        ratio = r["agg_peak_rss_bytes"] / base["agg_peak_rss_bytes"] if base else 0.0
        after = ", ".join(f"{s.get('VmRSS', 0) / MiB:.0f}" for s in r["agg_after_round"])
        acc = "n/a" if r["final_accuracy"] is None else f"{r['final_accuracy']:.3f}"
        lines.append(
            f"| `{r['codec']}` | {r['devices']:,} | {r['agg_peak_rss_bytes'] / MiB:.1f} | "
            f"{ratio:.2f}x | {r['agg_idle'].get('VmRSS', 0) / MiB:.0f} | {after} | "
            f"{r['broker_peak_rss_bytes'] / MiB:.1f} | {r['connect_seconds']:.2f} | "
            f"{', '.join(f'{x:.1f}' for x in r['round_seconds'])} | "
            f"{acc} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", default="10,1000")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--codecs", default="topk:0.03+int4+zstd,fp32")
    p.add_argument(
        "--eval-rows",
        type=int,
        default=EVAL_ROWS,
        help="central eval set: this many rows of the fleet's hold-out (0 = all of it)",
    )
    p.add_argument("--trace", action="store_true", help="tracemalloc in the aggregator")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "scale")
    p.add_argument("--interval", type=float, default=0.05, help="poll period (s)")
    args = p.parse_args()
    out: Path = args.out.resolve()
    rows = []
    t0 = time.perf_counter()
    for codec in args.codecs.split(","):
        for n in (int(x) for x in args.devices.split(",")):
            tag = codec.replace(":", "").replace("+", "-")
            rows.append(
                one(
                    out / f"{tag}-d{n}",
                    n,
                    codec,
                    args.rounds,
                    args.eval_rows,
                    args.interval,
                    args.trace,
                )
            )
    md = table(rows)
    cpu = next(
        (
            x.split(":", 1)[1].strip()
            for x in Path("/proc/cpuinfo").read_text().splitlines()
            if x.startswith("model name")
        ),
        platform.processor(),
    )
    machine = (
        f"{platform.node()}: {os.cpu_count()} x {cpu}, Linux {platform.release()}, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}, "
        f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())} at the end"
    )
    (out / "results.json").write_text(
        json.dumps(
            {
                "argv": sys.argv,
                "machine": machine,
                "rows": rows,
                "seconds": round(time.perf_counter() - t0, 1),
            },
            indent=2,
        )
        + "\n"
    )
    (out / "results.md").write_text(machine + "\n\n" + md + "\n")
    print()
    print(machine)
    print(md)


if __name__ == "__main__":
    main()
