"""Scale benchmark (issue 7): ``fedge simulate`` with 10, 100 and 1,000 devices on this machine.

Each device is a real MQTT session on the Mosquitto that ``fedge simulate`` starts itself. The
command runs as a subprocess; its process tree is polled with psutil (``bench/vs_flower/
proctree.py``) and, at every poll, the broker's established TCP connections are counted, so
nothing inside fedge is instrumented:

- connect time: from the first connection the broker holds (the aggregator's) to the moment
  it holds all ``devices + 1``;
- round time: ``seconds`` of each published round in ``metrics.jsonl`` (task to version);
- broker RSS: peak of the ``mosquitto`` process;
- process RSS: peak of the ``fedge simulate`` process (aggregator and all agents: one process).

Task: ``--dataset synthetic`` (FedProx Synthetic(1,1)): naturally federated, every device
gets its own task with >= 50 samples whatever the fleet size, whereas digits split over 1,000
devices leaves ~1.4 samples per device. ``--model mlp`` (60-64-64-10, 8,714 parameters, a
35 KB fp32 delta) rather than synthetic's default logreg (610 parameters), so a buffering
aggregator (O(devices x model)) would show: 1,000 deltas of 35 KB are 35 MB. 1 local epoch,
batch 32, 3 rounds.

    .venv/bin/python bench/scale/run.py [--devices 10,100,1000] [--rounds 3]
        [--out runs/bench/scale]

Writes ``OUT/results.json`` and ``OUT/results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent / "vs_flower"))

from proctree import run_measured  # noqa: E402


class BrokerWatch:
    """Per poll: the broker's RSS and its count of established client connections."""

    def __init__(self) -> None:
        self.broker: psutil.Process | None = None
        self.peak_rss = 0
        self.cpu_seconds = 0.0  # user + system, as of the last poll
        self.peak_conns = 0
        self.first_conn_t: float | None = None
        self.all_conn_t: float | None = None
        self.target = 0

    def __call__(self, t: float, root: psutil.Process, procs: list[psutil.Process]) -> None:
        if self.broker is None:
            self.broker = next((p for p in procs if _is_mosquitto(p)), None)
            if self.broker is None:
                return
        try:
            self.peak_rss = max(self.peak_rss, self.broker.memory_info().rss)
            cpu = self.broker.cpu_times()
            self.cpu_seconds = cpu.user + cpu.system
            port = _listen_port(self.broker)
            n = sum(
                1
                for c in self.broker.net_connections(kind="tcp")
                if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port
            )
        except psutil.Error:
            return
        self.peak_conns = max(self.peak_conns, n)
        if n >= 1 and self.first_conn_t is None:
            self.first_conn_t = t
        if n >= self.target and self.all_conn_t is None:
            self.all_conn_t = t


def _is_mosquitto(p: psutil.Process) -> bool:
    try:
        return p.name() == "mosquitto"
    except psutil.Error:
        return False


def _listen_port(p: psutil.Process) -> int | None:
    for c in p.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN:
            return int(c.laddr.port)
    return None


def simulate_cmd(out: Path, devices: int, rounds: int, extra: list[str]) -> list[str]:
    return [
        str(ROOT / ".venv" / "bin" / "fedge"), "simulate",
        "--dataset", "synthetic", "--model", "mlp", "--devices", str(devices),
        "--rounds", str(rounds), "--epochs", "1", "--batch-size", "32", "--lr", "0.05",
        "--seed", "0", "--round-timeout", "600", "--out", str(out), *extra,
    ]  # fmt: skip


def one(out: Path, devices: int, rounds: int, extra: list[str], interval: float) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    watch = BrokerWatch()
    watch.target = devices + 1  # the aggregator's session and one per device
    cmd = simulate_cmd(out, devices, rounds, extra)
    tree = run_measured(
        cmd, log=out / "stdout.log", interval=interval, timeout=3600, pss=False, on_sample=watch
    )
    rec: dict[str, Any] = {"devices": devices, **tree.as_dict()}
    summary_path = out / "summary.json"
    if tree.returncode != 0 or not summary_path.is_file():
        rec["error"] = (out / "stdout.log").read_text(errors="replace")[-2000:]
        print(f"{devices:5d} devices: FAILED (exit {tree.returncode}), see {out}/stdout.log")
        return rec
    s = json.loads(summary_path.read_text())
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ok = [r for r in records if "version" in r]
    connect = (
        watch.all_conn_t - watch.first_conn_t
        if watch.all_conn_t is not None and watch.first_conn_t is not None
        else None
    )
    rec |= {
        "connect_seconds": connect,
        "peak_connections": watch.peak_conns,
        "round_seconds": [round(r["seconds"], 3) for r in ok],
        "round_devices": [r["devices"] for r in ok],
        "failed_rounds": len(records) - len(ok),
        "broker_peak_rss_bytes": watch.peak_rss,
        "broker_cpu_seconds": round(watch.cpu_seconds, 2),
        "process_peak_rss_bytes": tree.root_peak_rss_bytes,
        "setup_seconds": s["setup_seconds"],
        "fleet_seconds": s["wall_seconds"],
        "final_accuracy": s["final_accuracy"],
        "uplink_bytes": s["uplink_bytes"],
        "downlink_bytes": s["downlink_bytes"],
    }
    print(
        f"{devices:5d} devices: connect {_s(connect)} | rounds "
        f"{', '.join(f'{x:.1f}' for x in rec['round_seconds'])} s | broker "
        f"{watch.peak_rss / 2**20:.0f} MiB, {watch.cpu_seconds:.1f} s CPU | process "
        f"{tree.root_peak_rss_bytes / 2**20:.0f} MiB"
        f" | tree {tree.peak_rss_bytes / 2**20:.0f} MiB | wall {tree.wall_seconds:.0f} s"
        f" | acc {s['final_accuracy']:.3f}",
        flush=True,
    )
    return rec


def _s(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f} s"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| devices | connect (s) | round times (s) | broker peak RSS (MiB) "
        "| broker CPU (s) | process peak RSS (MiB) | vs first row | wall (s) | final acc. |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    base = next((r for r in rows if "error" not in r), None)
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['devices']} | failed | | | | | | {r['wall_seconds']:.0f} | |")
            continue
        ratio = r["process_peak_rss_bytes"] / base["process_peak_rss_bytes"] if base else 0
        lines.append(
            f"| {r['devices']} | {_s(r['connect_seconds']).removesuffix(' s')} | "
            f"{', '.join(f'{x:.1f}' for x in r['round_seconds'])} | "
            f"{r['broker_peak_rss_bytes'] / 2**20:.1f} | {r['broker_cpu_seconds']:.1f} | "
            f"{r['process_peak_rss_bytes'] / 2**20:.0f} | {ratio:.2f}x | "
            f"{r['wall_seconds']:.0f} | {r['final_accuracy']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", default="10,100,1000")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "scale")
    p.add_argument("--interval", type=float, default=0.05, help="poll period (s)")
    p.add_argument("extra", nargs="*", help="more fedge simulate arguments, after --")
    args = p.parse_args()
    out: Path = args.out.resolve()
    rows = []
    t0 = time.perf_counter()
    for n in (int(x) for x in args.devices.split(",")):
        rows.append(one(out / f"d{n}", n, args.rounds, args.extra, args.interval))
    md = table(rows)
    cmd = " ".join(simulate_cmd(Path("OUT"), 0, args.rounds, args.extra)).replace(
        "--devices 0", "--devices N"
    )
    (out / "results.json").write_text(
        json.dumps(
            {"command": cmd, "cpus": os.cpu_count(), "rows": rows,
             "seconds": round(time.perf_counter() - t0, 1)},
            indent=2,
        )
        + "\n"
    )  # fmt: skip
    (out / "results.md").write_text(md + "\n")
    print()
    print(md)


if __name__ == "__main__":
    main()
