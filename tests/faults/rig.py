"""A fleet of real processes for fault injection: Mosquitto, the aggregator, edge agents.

Every part runs as its own OS process (``python -m aggregator`` / ``python -m edge_agent``, or
``python -m tests.faults.agent_host`` for several agents in one process, as a gateway would
run them), so a SIGKILL is a real crash. The outcome is read from what each side wrote to
disk: devices' ``acked.jsonl`` (updates the broker acknowledged) against the aggregator's
metrics (``counted``: the update id it folded per device and round) and its log (explicit
rejections); see ``tests/faults/audit.py``. Kills, stops and restarts done through the rig
(including ``rig.broker.kill()``) are put on a timeline for the recovery figure.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

from aggregator.checkpoint import load_checkpoint
from edge_agent.store import AgentStore
from simulation.broker import MosquittoBroker
from simulation.datasets import make_federated, write_npz_partitions
from tests.faults.audit import Event, Outcome, audit, late_rejections, recovery_seconds

__all__ = ["FaultRig", "Outcome", "rss_kb"]

ROOT = Path(__file__).resolve().parents[2]


def rss_kb(pid: int) -> int | None:
    """VmRSS of a live process, in kB (None once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class _TimedBroker:
    """The rig's broker: the same object, with kills, stops and restarts on the timeline."""

    def __init__(self, broker: MosquittoBroker, note: Any) -> None:
        self._broker = broker
        self._note = note

    def __getattr__(self, name: str) -> Any:
        return getattr(self._broker, name)

    def kill(self) -> None:
        self._note("fault", "broker SIGKILL")
        self._broker.kill()

    def stop(self, timeout: float = 10) -> None:
        self._note("fault", "broker SIGTERM")
        self._broker.stop(timeout)

    def restart(self, timeout: float = 10) -> MosquittoBroker:
        out = self._broker.restart(timeout)
        self._note("recover", "broker restarted")
        return out


class FaultRig:
    def __init__(
        self,
        tmp: Path,
        broker: MosquittoBroker,
        *,
        devices: int = 3,
        codec: str = "fp32",
        round_timeout: float = 20.0,
        min_devices: int | None = None,
        target_devices: int | None = None,
        rounds: int = 0,
        agents_per_process: int = 1,
        seed: int = 0,
        label: str = "",
    ) -> None:
        self.tmp = tmp
        self.broker: Any = _TimedBroker(broker, self.note)
        self.devices = devices
        self.label = label
        self.notes: dict[str, Any] = {}  # a test's own figures, for the report
        self.events: list[Event] = []
        self.recovery: float | None = None  # set by a test that measures recovery itself
        self.fleet = f"f{uuid.uuid4().hex[:8]}"
        self.state = tmp / "aggregator"
        self.logs = tmp / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        data = make_federated("digits", devices, "iid", seed=seed)
        write_npz_partitions(data, tmp / "data")
        self.agg_config = tmp / "aggregator.yaml"
        self.agg_settings: dict[str, Any] = {
            "broker": broker.url,
            "fleet": self.fleet,
            "state_dir": str(self.state),
            "hyper": {"epochs": 1},
            "codec": codec,
            "rounds": rounds,
            "target_devices": target_devices or devices,
            "min_devices": min_devices or devices,
            "round_timeout": round_timeout,
            "eval_data": str(tmp / "data" / "test.npz"),
        }
        self.agg_config.write_text(yaml.safe_dump(self.agg_settings))
        self.agent_configs = []
        for i in range(devices):
            cfg = tmp / f"agent-{i}.yaml"
            cfg.write_text(
                yaml.safe_dump(
                    {
                        "device_id": f"dev-{i}",
                        "broker": broker.url,
                        "fleet": self.fleet,
                        "state_dir": str(self.device_dir(i)),
                        "data": str(tmp / "data" / f"device-{i:03d}.npz"),
                        "keepalive": 5,
                        "seed": i,
                    }
                )
            )
            self.agent_configs.append(cfg)
        # Unit u runs devices units[u]: one device per process, or several (agent_host).
        k = max(1, agents_per_process)
        self.units = [list(range(s, min(s + k, devices))) for s in range(0, devices, k)]
        self.aggregator: subprocess.Popen[bytes] | None = None
        self.agents: dict[int, subprocess.Popen[bytes]] = {}
        self._killed: set[int] = set()  # pids the rig killed itself

    def device_dir(self, i: int) -> Path:
        return self.tmp / f"dev-{i}"

    def note(self, kind: str, what: str) -> None:
        self.events.append(Event(time.time(), kind, what))

    # -- processes ----------------------------------------------------------------------------
    def _spawn(self, args: list[str], log: str, crash_at: str | None) -> Any:
        env = dict(os.environ)
        env.pop("FEDGE_CRASH_AT", None)
        if crash_at:
            env["FEDGE_CRASH_AT"] = crash_at
        with (self.logs / log).open("ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", *args, "--log-level", "INFO"],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=ROOT,
            )

    def _restarting(self, prev: subprocess.Popen[bytes] | None, what: str) -> None:
        """Put a restart on the timeline; a process that died on its own is a fault found now."""
        if prev is None:
            return
        if prev.poll() is not None and prev.pid not in self._killed and prev.returncode != 0:
            self.note("fault", f"{what} died (exit {prev.returncode})")
        self.note("recover", f"{what} restarted")

    def start_aggregator(self, crash_at: str | None = None) -> None:
        self._restarting(self.aggregator, "aggregator")
        self.aggregator = self._spawn(
            ["aggregator", "--config", str(self.agg_config)], "aggregator.log", crash_at
        )

    def start_agent(self, unit: int, crash_at: str | None = None) -> None:
        """Start unit ``unit`` (device ``unit`` when each device has its own process)."""
        self._restarting(self.agents.get(unit), f"agent unit {unit}")
        devs = self.units[unit]
        if len(devs) == 1:
            args = ["edge_agent", "--config", str(self.agent_configs[devs[0]])]
        else:
            args = ["tests.faults.agent_host", *(str(self.agent_configs[i]) for i in devs)]
        self.agents[unit] = self._spawn(args, f"unit-{unit}.log", crash_at)

    def start_all(self) -> None:
        self.start_aggregator()
        for u in range(len(self.units)):
            self.start_agent(u)

    def _kill(self, p: subprocess.Popen[bytes] | None, sig: int = signal.SIGKILL) -> None:
        if p is not None and p.poll() is None:
            self._killed.add(p.pid)
            p.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(15)
            if p.poll() is None:
                p.kill()
                p.wait(5)

    def kill_aggregator(self) -> None:
        self.note("fault", "aggregator SIGKILL")
        self._kill(self.aggregator)

    def kill_agent(self, unit: int) -> None:
        self.note("fault", f"agent unit {unit} SIGKILL")
        self._kill(self.agents.get(unit))

    def stop(self) -> None:
        for p in self.agents.values():
            self._kill(p, signal.SIGTERM)
        self._kill(self.aggregator, signal.SIGTERM)

    # -- observation --------------------------------------------------------------------------
    def records(self) -> list[dict[str, Any]]:
        path = self.state / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]

    def version(self) -> int:
        ck = load_checkpoint(self.state / "checkpoint.msgpack")
        return ck.version if ck else 0

    def wait_versions(self, n: int, timeout: float) -> float:
        """Wait until version ``n`` is checkpointed; returns the seconds it took."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            with contextlib.suppress(Exception):
                if self.version() >= n:
                    return time.monotonic() - t0
            if self.aggregator is not None and self.aggregator.poll() not in (None, -9, 0):
                raise AssertionError(f"aggregator exited: {self.tail('aggregator.log')}")
            time.sleep(0.1)
        raise AssertionError(
            f"version {n} not reached in {timeout} s; aggregator log: {self.tail('aggregator.log')}"
        )

    def tail(self, log: str, n: int = 1500) -> str:
        with contextlib.suppress(FileNotFoundError):
            return (self.logs / log).read_text()[-n:]
        return ""

    def acked(self) -> list[tuple[str, int, str]]:
        """(device, round, update id) of every update the broker acknowledged to a device."""
        return [
            (f"dev-{i}", int(a["round"]), str(a["update_id"]))  # type: ignore[call-overload]
            for i in range(self.devices)
            for a in AgentStore(self.device_dir(i)).acked()
        ]

    def outcome(self, recovery: float | None = None) -> Outcome:
        records = self.records()
        log = ""
        with contextlib.suppress(FileNotFoundError):
            log = (self.logs / "aggregator.log").read_text(errors="replace")
        if recovery is None:
            recovery = self.recovery
        if recovery is None:
            recovery = recovery_seconds(self.events, records)
        return audit(records, self.acked(), late_rejections(log), recovery)
