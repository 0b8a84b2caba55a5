"""``fedge simulate --secagg [--secagg-dropout F]``: the settings, the simulated dropouts and
the summary of a secure fleet (aggregator/secure_rounds.py, edge_agent/secagg.py)."""

from __future__ import annotations

from typing import Any

import numpy as np

from aggregator.config import SecureAggregationConfig
from edge_agent.secagg import SecAggOptions
from fedge.errors import ConfigError

__all__ = ["check_strategy", "secagg_device", "secagg_settings", "secagg_summary"]

_STAGES = ("advertise", "shares", "masked")
STAGE_TIMEOUT = 5.0  # seconds per short stage: loopback, devices in this process


def check_strategy(strategy: str) -> None:
    from aggregator.strategies import STRATEGIES

    cls = STRATEGIES.get(strategy)
    if cls is not None and not cls.sums_linearly and strategy != "dp-fedavg":
        linear = ", ".join(n for n, c in STRATEGIES.items() if c.sums_linearly)
        linear += ", dp-fedavg"
        raise ConfigError(
            f"--secagg with --strategy {strategy}: it needs each device's update and the "
            f"aggregator sees only the sum; use one of {linear}"
        )


def secagg_settings(on: bool, devices: int) -> dict[str, Any]:
    """The aggregator's ``secure_aggregation`` section for a simulated fleet (none if off)."""
    if not on:
        return {}
    t = STAGE_TIMEOUT
    return {
        "secure_aggregation": SecureAggregationConfig(
            max_devices=max(2, devices), advertise_timeout=t, share_timeout=t, unmask_timeout=t
        )
    }


def secagg_device(on: bool, dropout: float, seed: int, i: int) -> SecAggOptions | None:
    """Device i's secure-round options: in each round, with probability ``dropout`` (drawn
    per seed, device and round), it vanishes after a stage drawn uniformly."""
    if not on:
        return None

    def vanish_after(round_id: int) -> str | None:
        rng = np.random.default_rng([seed, i, round_id, 0x5A])
        if rng.random() >= dropout:
            return None
        return _STAGES[int(rng.integers(len(_STAGES)))]

    return SecAggOptions(secure_only=True, vanish_after=vanish_after if dropout > 0 else None)


def secagg_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over the published versions of what the secure rounds cost."""
    sa = [r["secagg"] for r in records if "secagg" in r]
    if not sa:
        return {}
    stages: dict[str, list[float]] = {}
    for r in sa:
        for k, v in r["stage_seconds"].items():
            stages.setdefault(k, []).append(v)
    masked = sum(r["masked_bytes"] for r in sa)
    elements = sum(r["elements"] * r["survivors"] for r in sa)
    return {
        "survivors_mean": float(np.mean([r["survivors"] for r in sa])),
        "ring_bits": sa[-1]["ring_bits"],
        "wire_bits_per_parameter": round(8 * masked / max(elements, 1), 3),
        "masked_bytes": masked,
        "relay_bytes": sum(r["relay_bytes"] for r in sa),
        "stage_seconds_mean": {k: round(float(np.mean(v)), 3) for k, v in stages.items()},
    }
