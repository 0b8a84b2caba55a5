"""What ``fedge simulate`` reports: the per-version line, the summary and its byte accounting
(uplink, downlink by kind counted at the devices, WAN links).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edge_agent.agent import EdgeAgent
from fedge.transport.mqtt import BrokerURL
from simulation.secagg import secagg_summary
from simulation.sim_config import SimConfig
from simulation.topology import Topology
from simulation.wiring import _Run

__all__: list[str] = []


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _printer(
    cfg: SimConfig, run: _Run, say: Callable[[str], None]
) -> Callable[[dict[str, Any]], None]:
    """The per-version line on the terminal (downlink counted at the devices)."""
    prev = {"down": 0}

    def on_round(rec: dict[str, Any]) -> None:
        down = sum(a.counters.rx_bytes for a in run.agents)
        run.downlink_curve.append(down - prev["down"])
        say(
            f"round {rec['round']:3d}  v{rec['version']:<3d} | devices {rec['devices']:3d}/"
            f"{cfg.devices} | acc {rec.get('accuracy', float('nan')):.4f} | "
            f"loss {rec.get('loss', float('nan')):.4f} | "
            f"up {_fmt_bytes(rec['uplink_bytes'])} | "
            f"down {_fmt_bytes(down - prev['down'])} | {rec['seconds']:.1f} s"
        )
        prev["down"] = down

    return on_round


def _summary(
    cfg: SimConfig, run: _Run, out: Path, url: BrokerURL, *, wall: float, setup: float
) -> dict[str, Any]:
    agg = run.aggregator
    assert agg is not None
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ok = [r for r in records if "version" in r]
    last = ok[-1] if ok else {}
    return {
        "rounds": agg.version,
        "failed_rounds": len(records) - len(ok),
        "final_accuracy": last.get("accuracy"),
        "final_loss": last.get("loss"),
        "dp_epsilon": last.get("dp_epsilon"),  # None unless --strategy dp-fedavg
        "uplink_bytes": sum(r["uplink_bytes"] for r in ok),
        "downlink_bytes": sum(a.counters.rx_bytes for a in run.agents),
        **_downlink_split(run.agents),
        "downlink_curve": run.downlink_curve,
        "wall_seconds": round(wall, 3),
        "setup_seconds": round(setup, 3),
        "model_onnx": str(agg.latest_model_path.resolve()),
        # The serving model: structurally pruned units removed (the training model otherwise).
        "model_bytes": int(last.get("serving_bytes", agg.latest_model_path.stat().st_size)),
        "sparsity": last.get("sparsity", 0.0),
        "metrics": str((out / "metrics.jsonl").resolve()),
        "rejected": dict(agg.metrics.rejected),
        "shard_workers": {w.name: w.folded for w in run.workers},  # updates each one folded
        **_wan_summary(run.topology),
        "secagg": secagg_summary(ok) if cfg.secagg else None,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "broker": str(url),
    }


def _wan_summary(topology: Topology | None) -> dict[str, Any]:
    """``wan_bytes``: bytes across the WAN links both ways (None: not measured), the detail,
    and per site gateway the updates it folded."""
    wan = topology.wan() if topology is not None else None
    return {
        "wan_bytes": wan["bytes_up"] + wan["bytes_down"] if wan else None,
        "wan": wan,
        "sites": {g.name: g.folded for g in topology.gateways} if topology else {},
    }


def _downlink_split(agents: list[EdgeAgent]) -> dict[str, int]:
    """What came down, by kind, counted at the devices (MQTT PUBLISH packets)."""
    c = [a.counters for a in agents]
    return {
        "downlink_patch_bytes": sum(x.rx_patch_bytes for x in c),
        "downlink_model_bytes": sum(x.rx_model_bytes for x in c),
        "downlink_task_bytes": sum(x.rx_task_bytes for x in c),
        "status_bytes": sum(x.tx_status_bytes for x in c),  # devices' statuses, uplink
        "patches_rejected": sum(x.patches_rejected for x in c),
        "resyncs": sum(a.downlink.resyncs for a in agents),
    }


def _wait_for_final_model(agents: list[EdgeAgent], version: int, timeout: float) -> None:
    """Let the last retained model reach the devices, so downlink bytes are complete."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if all(a.model is not None and a.model.version >= version for a in agents):
            return
        time.sleep(0.05)
