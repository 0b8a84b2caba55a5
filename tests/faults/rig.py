"""A fleet of real processes for fault injection: Mosquitto, the aggregator, edge agents.

Every part runs as its own OS process (``python -m aggregator`` / ``python -m edge_agent``),
so a SIGKILL is a real crash. The outcome is read from what each side wrote to disk: devices'
``acked.jsonl`` (updates the broker acknowledged) against the aggregator's metrics
(``counted``: the update id it folded per device and round).
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
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from aggregator.checkpoint import load_checkpoint
from edge_agent.store import AgentStore
from simulation.broker import MosquittoBroker
from simulation.datasets import make_federated, write_npz_partitions

__all__ = ["FaultRig", "Outcome"]


@dataclass(frozen=True)
class Outcome:
    versions: int  # published versions (rounds completed)
    failed_rounds: int
    acked: int  # updates the broker acknowledged to devices, in rounds that ended
    counted: int  # updates the aggregator folded
    lost: int  # acked by the broker, in a round that ended, but never counted
    double_counted: int  # an update id or (device, round) counted more than once
    recovery_seconds: float | None = None

    def as_row(self) -> dict[str, Any]:
        return self.__dict__.copy()


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
        seed: int = 0,
    ) -> None:
        self.tmp = tmp
        self.broker = broker
        self.devices = devices
        self.fleet = f"f{uuid.uuid4().hex[:8]}"
        self.state = tmp / "aggregator"
        self.logs = tmp / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        data = make_federated("digits", devices, "iid", seed=seed)
        write_npz_partitions(data, tmp / "data")
        self.agg_config = tmp / "aggregator.yaml"
        self.agg_config.write_text(
            yaml.safe_dump(
                {
                    "broker": broker.url,
                    "fleet": self.fleet,
                    "state_dir": str(self.state),
                    "hyper": {"epochs": 1},
                    "codec": codec,
                    "rounds": 0,
                    "target_devices": devices,
                    "min_devices": min_devices or devices,
                    "round_timeout": round_timeout,
                    "eval_data": str(tmp / "data" / "test.npz"),
                }
            )
        )
        self.agent_configs = []
        for i in range(devices):
            cfg = tmp / f"agent-{i}.yaml"
            cfg.write_text(
                yaml.safe_dump(
                    {
                        "device_id": f"dev-{i}",
                        "broker": broker.url,
                        "fleet": self.fleet,
                        "state_dir": str(tmp / f"dev-{i}"),
                        "data": str(tmp / "data" / f"device-{i:03d}.npz"),
                        "keepalive": 5,
                        "seed": i,
                    }
                )
            )
            self.agent_configs.append(cfg)
        self.aggregator: subprocess.Popen[bytes] | None = None
        self.agents: dict[int, subprocess.Popen[bytes]] = {}

    # -- processes ----------------------------------------------------------------------------
    def _spawn(self, module: str, config: Path, log: str, crash_at: str | None) -> Any:
        env = dict(os.environ)
        env.pop("FEDGE_CRASH_AT", None)
        if crash_at:
            env["FEDGE_CRASH_AT"] = crash_at
        with (self.logs / log).open("ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", module, "--config", str(config), "--log-level", "INFO"],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )

    def start_aggregator(self, crash_at: str | None = None) -> None:
        self.aggregator = self._spawn("aggregator", self.agg_config, "aggregator.log", crash_at)

    def start_agent(self, i: int, crash_at: str | None = None) -> None:
        self.agents[i] = self._spawn("edge_agent", self.agent_configs[i], f"dev-{i}.log", crash_at)

    def start_all(self) -> None:
        self.start_aggregator()
        for i in range(self.devices):
            self.start_agent(i)

    @staticmethod
    def _kill(p: subprocess.Popen[bytes] | None, sig: int = signal.SIGKILL) -> None:
        if p is not None and p.poll() is None:
            p.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(15)
            if p.poll() is None:
                p.kill()
                p.wait(5)

    def kill_aggregator(self) -> None:
        self._kill(self.aggregator)

    def kill_agent(self, i: int) -> None:
        self._kill(self.agents.get(i))

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

    def outcome(self, recovery_seconds: float | None = None) -> Outcome:
        recs = self.records()
        ended = {r["round"] for r in recs}
        counted_pairs = [
            (d, r["round"], uid) for r in recs for d, uid in r.get("counted", {}).items()
        ]
        counted_ids = Counter(uid for _, _, uid in counted_pairs)
        counted_dr = Counter((d, rnd) for d, rnd, _ in counted_pairs)
        acked = set()
        for i in range(self.devices):
            for a in AgentStore(self.tmp / f"dev-{i}").acked():
                if a["round"] in ended:
                    acked.add((f"dev-{i}", a["round"], a["update_id"]))
        counted_set = {(d, rnd, uid) for d, rnd, uid in counted_pairs}
        # An update acked for a round that closed with that device counted under another id is
        # a resend of the same round (same device, same round): not a loss.
        lost = {a for a in acked if a not in counted_set and (a[0], a[1]) not in counted_dr}
        return Outcome(
            versions=sum(1 for r in recs if "version" in r),
            failed_rounds=sum(1 for r in recs if "failed" in r),
            acked=len(acked),
            counted=len(counted_pairs),
            lost=len(lost),
            double_counted=sum(c - 1 for c in counted_ids.values() if c > 1)
            + sum(c - 1 for c in counted_dr.values() if c > 1),
            recovery_seconds=recovery_seconds,
        )
