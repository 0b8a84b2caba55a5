"""Simulated device heterogeneity over a real Mosquitto: FedProx's stragglers (dropped or
kept) and slow devices (a fixed compute delay per device)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from simulation.broker import MosquittoBroker
from simulation.fleet import SimConfig, device_delays, simulate, straggler_draw

pytestmark = pytest.mark.integration

DEVICES = 4


def _records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _non_stragglers(seed: int, rnd: int, p: float, epochs: int) -> int:
    """Devices that are not stragglers in round ``rnd``: recomputed from the agents' seeds."""
    return sum(
        straggler_draw(p, (seed * 7919 + i) * 1_000_003 + rnd, epochs) is None
        for i in range(DEVICES)
    )


def _cfg(tmp_path: Path, broker: MosquittoBroker, **over: Any) -> SimConfig:
    base: dict[str, Any] = {
        "out": tmp_path / "run",
        "devices": DEVICES,
        "rounds": 2,
        "partition": "iid",
        "epochs": 1,
        "codec": "fp32",
        "sign": False,
        "broker": broker.url,
    }
    return SimConfig(**(base | over))


def test_dropped_stragglers_send_nothing_so_rounds_count_fewer_devices(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    # Seed 0, p = 0.5: rounds 1 and 2 have 2 and 1 non-stragglers of 4 (see _non_stragglers);
    # the rounds wait out the deadline, as dropped stragglers never answer.
    cfg = _cfg(
        tmp_path, broker, stragglers=0.5, drop_stragglers=True, min_devices=1, round_timeout=2.0
    )

    simulate(cfg, say=lambda _s: None)

    recs = [r for r in _records(cfg.out) if "version" in r]
    expected = [_non_stragglers(0, r["round"], 0.5, cfg.epochs) for r in recs]
    assert [r["devices"] for r in recs] == expected
    assert min(expected) < DEVICES  # the seed does exercise dropping


def test_kept_stragglers_all_count(broker: MosquittoBroker, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, broker, stragglers=0.5, min_devices=1, round_timeout=30)

    summary = simulate(cfg, say=lambda _s: None)

    recs = _records(cfg.out)
    assert [r["devices"] for r in recs] == [DEVICES] * cfg.rounds
    assert summary["failed_rounds"] == 0


def test_sync_round_waits_for_the_slowest_device_delay(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    delays = (0.1, 1.0)  # log-spaced over the 4 devices: the slowest adds 1.0 s
    cfg = _cfg(tmp_path, broker, device_delay=delays, round_timeout=30)

    simulate(cfg, say=lambda _s: None)

    recs = _records(cfg.out)
    assert [r["devices"] for r in recs] == [DEVICES] * cfg.rounds
    # A lower bound only: a timer never fires early, however loaded the machine.
    assert all(r["seconds"] >= delays[1] for r in recs)


def test_async_publishes_versions_without_waiting_for_the_slowest_device(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    cfg = _cfg(
        tmp_path,
        broker,
        mode="async",
        async_buffer=2,
        rounds=3,
        device_delay=(0.05, 60.0),  # the slowest device would answer after a minute
        min_devices=1,
        round_timeout=30,
    )
    delays = device_delays(cfg.device_delay, DEVICES, cfg.seed)
    slowest = f"dev-{delays.index(max(delays)):04d}@"

    summary = simulate(cfg, say=lambda _s: None)

    recs = _records(cfg.out)
    assert [r["version"] for r in recs] == [1, 2, 3]
    assert all(r["devices"] == 2 for r in recs)
    assert not any(k.startswith(slowest) for r in recs for k in r["counted"])
    assert summary["wall_seconds"] < 50  # generous: far below the slowest device's minute
