"""The aggregator service under tracemalloc, for ``bench/scale/run.py --trace``.

Runs exactly what ``fedge aggregator --config FILE`` runs (``aggregator.cli.run``), with
``tracemalloc`` started first. Every SIGUSR1 (the benchmark sends one when the aggregator is
idle and one after each round) queues a dump; one thread, one dump at a time, writes a
snapshot to ``TRACE_DIR/snap-NNN.pickle`` and appends the traced current bytes and the traced
peak since the previous dump to ``TRACE_DIR/traced.jsonl``. RSS under tracemalloc is not the
service's RSS (traces and snapshots cost memory): read sizes from the traces, not from RSS.

    .venv/bin/python bench/scale/agg_trace.py --trace-dir DIR --config aggregator.yaml

``report(DIR)`` (called by run.py) compares the last snapshot with the first (idle) by source
line and lists the traced peak between dumps.
"""

from __future__ import annotations

import argparse
import itertools
import json
import queue
import signal
import sys
import threading
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def report(trace_dir: Path, top: int = 15) -> str:
    """Traced bytes per phase, and the source lines whose live allocations grew the most from
    the first snapshot to the last."""
    snaps = sorted(trace_dir.glob("snap-*.pickle"))
    out = ["snapshot  current (MiB)  peak since previous (MiB)"]
    for line in (trace_dir / "traced.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.append(f"{r['snapshot']:8d}  {r['current'] / 2**20:13.2f}  {r['peak'] / 2**20:25.2f}")
    if len(snaps) < 2:
        return "\n".join(out)
    first = tracemalloc.Snapshot.load(str(snaps[0]))
    last = tracemalloc.Snapshot.load(str(snaps[-1]))
    diff = last.compare_to(first, "lineno")
    total = sum(d.size_diff for d in diff)
    out.append(f"\n{snaps[-1].name} - {snaps[0].name}: {total / 2**20:+.2f} MiB traced, top lines:")
    out += [
        f"{d.size_diff / 1024:+10.1f} KiB {d.count_diff:+7d} blocks  {d.traceback}"
        for d in diff[:top]
    ]
    return "\n".join(out)


def main() -> None:
    from aggregator import cli

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trace-dir", type=Path, required=True)
    p.add_argument("--frames", type=int, default=12)
    cli.add_arguments(p)
    args = p.parse_args()
    trace_dir: Path = args.trace_dir
    trace_dir.mkdir(parents=True, exist_ok=True)
    tracemalloc.start(args.frames)
    asked: queue.SimpleQueue[int | None] = queue.SimpleQueue()  # put() is signal-safe

    def dumper() -> None:
        # One dump at a time, off the signal handler: a SIGUSR1 that arrives during a dump
        # (10-device rounds take 0.2 s) would otherwise nest a second snapshot inside the first.
        for i in itertools.count():
            if asked.get() is None:
                return
            current, peak = tracemalloc.get_traced_memory()
            snap = tracemalloc.take_snapshot()
            snap.dump(str(trace_dir / f"snap-{i:03d}.pickle"))
            del snap
            # After the dump: the snapshot's own objects are traced too; "peak" is the round's.
            tracemalloc.reset_peak()
            with (trace_dir / "traced.jsonl").open("a") as f:
                f.write(json.dumps({"snapshot": i, "current": current, "peak": peak}) + "\n")

    thread = threading.Thread(target=dumper, name="trace-dump")
    thread.start()
    signal.signal(signal.SIGUSR1, lambda _s, _f: asked.put(1))
    try:
        cli.run(args)
        time.sleep(1.0)  # the benchmark's signal for the last round may still be on its way
    finally:
        asked.put(None)  # finish the dumps asked for, then exit
        thread.join()


if __name__ == "__main__":
    main()
