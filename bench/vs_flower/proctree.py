"""Run a command and measure its whole process tree: wall time, peak memory, per-process peaks.

Memory is polled with psutil every ``interval`` seconds over the root process and every
descendant (processes that were once seen stay tracked if they get re-parented, as daemons
do). Two sums are recorded at every sample, and their maxima reported:

- ``peak_rss_bytes``: the sum of resident set sizes. Shared pages (torch's libraries mapped
  by several workers, shared memory) count once per process, so this over-states a tree of
  many processes that import the same libraries.
- ``peak_pss_bytes``: the sum of proportional set sizes (shared pages split between the
  processes that map them), which adds up to what the tree really holds in RAM.

A poll can miss a peak shorter than ``interval``; both frameworks are sampled the same way.

Used by ``bench/vs_flower/run.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

__all__ = ["TreeRun", "run_measured"]


@dataclass
class TreeRun:
    cmd: list[str]
    returncode: int
    wall_seconds: float
    peak_rss_bytes: int
    peak_pss_bytes: int
    peak_processes: int
    # name -> peak RSS of the largest process with that name (mosquitto, python, raylet...)
    peak_rss_by_name: dict[str, int] = field(default_factory=dict)
    # pid -> peak RSS, with the name, for every process ever seen in the tree
    peak_rss_by_pid: dict[int, tuple[str, int]] = field(default_factory=dict)
    root_peak_rss_bytes: int = 0
    samples: int = 0
    timed_out: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "cmd": " ".join(self.cmd),
            "returncode": self.returncode,
            "wall_seconds": round(self.wall_seconds, 3),
            "peak_rss_bytes": self.peak_rss_bytes,
            "peak_pss_bytes": self.peak_pss_bytes,
            "peak_processes": self.peak_processes,
            "root_peak_rss_bytes": self.root_peak_rss_bytes,
            "peak_rss_by_name": self.peak_rss_by_name,
            "samples": self.samples,
            "timed_out": self.timed_out,
        }


def _name(p: psutil.Process) -> str:
    try:
        name = p.name()
        if name.startswith("python"):
            # ray workers rename themselves (ray::...), plain python shows its script
            cmd = p.cmdline()
            script = next((Path(c).name for c in cmd[1:] if not c.startswith("-")), "")
            return f"python:{script}" if script else name
        return name
    except psutil.Error:
        return "?"


def run_measured(
    cmd: Sequence[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    log: Path | None = None,
    interval: float = 0.1,
    timeout: float = 3600.0,
    pss: bool = True,
    on_sample: Callable[[float, psutil.Process, list[psutil.Process]], None] | None = None,
) -> TreeRun:
    """Run ``cmd`` to completion (stdout+stderr to ``log``) and return its measurements.

    ``on_sample(t, root, procs)`` is called at every poll with the seconds since launch, so a
    caller can record more (e.g. a broker's connection count).
    """
    cmd = [str(c) for c in cmd]
    out = log.open("wb") if log is not None else subprocess.DEVNULL
    t0 = time.perf_counter()
    # A session of its own: on time-out the whole group is ended by its id, nothing else.
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    root = psutil.Process(proc.pid)
    tracked: dict[int, psutil.Process] = {proc.pid: root}
    by_pid: dict[int, tuple[str, int]] = {}
    peak_rss = peak_pss = peak_n = root_peak = samples = 0
    timed_out = False
    try:
        while proc.poll() is None:
            t = time.perf_counter() - t0
            if t > timeout:
                timed_out = True
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                break
            try:
                for c in root.children(recursive=True):
                    tracked.setdefault(c.pid, c)
            except psutil.Error:
                pass
            rss_sum = pss_sum = n = 0
            alive: list[psutil.Process] = []
            for pid, p in list(tracked.items()):
                try:
                    if pss:
                        mi = p.memory_full_info()
                        rss, pss_v = mi.rss, mi.pss
                    else:
                        rss = p.memory_info().rss
                        pss_v = rss
                except (psutil.NoSuchProcess, psutil.ZombieProcess):
                    del tracked[pid]
                    continue
                except psutil.AccessDenied:
                    continue
                alive.append(p)
                rss_sum += rss
                pss_sum += pss_v
                n += 1
                name, best = by_pid.get(pid, (None, 0))
                if name is None:
                    name = _name(p)
                by_pid[pid] = (name, max(best, rss))
                if pid == proc.pid:
                    root_peak = max(root_peak, rss)
            peak_rss, peak_pss, peak_n = (
                max(peak_rss, rss_sum),
                max(peak_pss, pss_sum),
                max(peak_n, n),
            )
            samples += 1
            if on_sample is not None:
                on_sample(t, root, alive)
            time.sleep(interval)
        rc = proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if log is not None:
            out.close()  # type: ignore[union-attr]
    wall = time.perf_counter() - t0
    by_name: dict[str, int] = {}
    for name, rss in by_pid.values():
        by_name[name] = max(by_name.get(name, 0), rss)
    return TreeRun(
        cmd=cmd,
        returncode=rc if not timed_out else -1,
        wall_seconds=wall,
        peak_rss_bytes=peak_rss,
        peak_pss_bytes=peak_pss,
        peak_processes=peak_n,
        peak_rss_by_name=by_name,
        peak_rss_by_pid=by_pid,
        root_peak_rss_bytes=root_peak,
        samples=samples,
        timed_out=timed_out,
    )
