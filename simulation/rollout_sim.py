"""``fedge simulate --rollout STAGES``: after training, release the final version to the
simulated fleet through staged canaries, with shadow evaluation on each device's hold-out.

The fleet first serves a baseline, the version half-way through training (released to every
device at once); then the candidate goes through ``STAGES``: the final version (``good``),
or that version with its weights permuted within each tensor, registered as the version
after the last trained one (``bad``; training has ended, so the number is free), which the
canaries must catch. Commands go through the operator's real path (request files in the
aggregator's state directory). ``rollout.json`` records the outcome, each stage (fraction,
cohort, the reports of its devices, the decision, its duration), ``outside_cohort_served``:
how many devices switched to the candidate while outside the cohort of the stage running
then (their on-disk switch history against the stages' times), and the timing.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.rollout_requests import submit, wait_result
from aggregator.service import Aggregator
from edge_agent.agent import EdgeAgent
from edge_agent.serving_store import ServingStore
from fedge.envelopes import cohort_bound, in_cohort
from fedge.errors import ConfigError

__all__ = ["HOLDOUT_FRACTION", "run_rollout", "split_holdout"]

HOLDOUT_FRACTION = 0.2


def split_holdout(
    x: np.ndarray, y: np.ndarray, seed: int
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(train, hold-out): a seeded ``HOLDOUT_FRACTION`` of a device's samples (at least one,
    none when it has one sample) kept out of training for shadow evaluation."""
    n = len(y)
    k = min(n - 1, max(1, round(HOLDOUT_FRACTION * n)))
    order = np.random.default_rng(seed).permutation(n)
    hold, train = order[:k], order[k:]
    if k <= 0:
        return (x, y), (x, y)
    return (x[train], y[train]), (x[hold], y[hold])


def _command(state_dir: Path, cmd: str, **args: Any) -> str:
    answer = wait_result(state_dir, submit(state_dir, cmd, args), 15)
    if not answer.get("ok"):
        raise ConfigError(f"rollout {cmd}: {answer.get('message')}")
    return str(answer["message"])


def _wait_outcome(agg: Aggregator, outcomes: tuple[str, ...], timeout: float) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        o = agg.rollout.state.outcome
        if o in outcomes:
            return o
        time.sleep(0.05)
    st = agg.rollout.state
    waiting = {d: r.to_map() for d, r in st.reports.items()}
    raise ConfigError(
        f"the rollout did not end within {timeout:.0f} s: outcome {st.outcome}, active "
        f"{st.active.to_map() if st.active else None}, reports {waiting}, devices "
        f"{sorted(st.devices)}"
    )


def _register_shuffled(agg: Aggregator, source: int, version: int, seed: int) -> None:
    from models.onnx_export import OnnxTemplate
    from models.onnx_weights import read_initializers

    onnx, meta = agg.registry.load(source)
    rng = np.random.default_rng(seed)
    weights = {
        k: rng.permutation(v.ravel()).reshape(v.shape) for k, v in read_initializers(onnx).items()
    }
    a = agg.arch
    bad = OnnxTemplate(a.name, a.input_dim, a.num_classes).render(weights)
    meta = {**meta, "version": version, "sha256": hashlib.sha256(bad).hexdigest()}
    agg.registry.save(version, bad, {**meta, "bytes": len(bad), "origin": f"v{source} shuffled"})


def run_rollout(
    agg: Aggregator,
    agents: list[EdgeAgent],
    out: Path,
    *,
    stages: tuple[float, ...],
    candidate: str,
    max_regression: float,
    min_devices: int,
    seed: int,
    say: Any = print,
) -> dict[str, Any]:
    """Baseline release, then the candidate through ``stages``; writes ``out/rollout.json``."""
    state = agg.config.state_dir
    final = agg.version
    baseline = final // 2
    t0 = time.perf_counter()
    _command(state, "start", version=baseline, stages=[1.0])
    _wait_outcome(agg, ("promoted",), 60)
    devices = [a.device_id for a in agents]
    _wait_all_serve(agents, baseline, 30)
    t_base = time.perf_counter() - t0
    say(f"rollout: baseline v{baseline} served by all {len(agents)} devices ({t_base:.1f} s)")
    version = final
    if candidate == "bad":
        version = final + 1
        _register_shuffled(agg, final, version, seed)
    first_event = len(agg.rollout.state.history)
    t1 = time.perf_counter()
    say(f"rollout: v{version} ({candidate}) through stages {','.join(f'{s:g}' for s in stages)}")
    _command(
        state, "start", version=version, stages=list(stages),
        max_regression=max_regression, min_devices=min_devices,
    )  # fmt: skip
    outcome = _wait_outcome(agg, ("promoted", "rolled_back"), 60 + 30 * len(stages))
    if outcome == "promoted":
        _wait_all_serve(agents, version, 30)
    else:
        _wait_all_serve(agents, baseline, 30)
    seconds = time.perf_counter() - t1
    events = agg.rollout.state.history[first_event:]
    reports = agg.rollout.state.reports
    fleet = agg.topics.fleet
    # Stage i runs from its "started"/"advanced" event to the next event (its decision).
    starts = [k for k, e in enumerate(events) if e["event"] in ("started", "advanced")]
    switches = {a.device_id: _switches(a, version) for a in agents}
    stage_rows: list[dict[str, Any]] = []
    outside: set[str] = set()
    for k in starts:
        i = int(events[k]["stage"])
        fraction = stages[i]
        cohort = sorted(d for d in devices if in_cohort(fleet, d, cohort_bound(fraction)))
        decision = events[k + 1] if k + 1 < len(events) else None
        begin, until = events[k]["ts"], decision["ts"] if decision else time.time()
        # Devices outside this stage's cohort that switched to the candidate during it.
        outside |= {
            d
            for d, times in switches.items()
            if d not in cohort and any(begin <= t <= until for t in times)
        }
        stage_rows.append(
            {
                "stage": i,
                "fraction": fraction,
                "cohort": cohort,
                "reports": {d: reports[d].to_map() for d in cohort if d in reports},
                "decision": decision["event"] if decision else None,
                "reason": decision.get("reason") if decision else None,
                "regression_pp": decision.get("regression_pp") if decision else None,
                "seconds": round(until - begin, 3),
            }
        )
    reached = stage_rows[-1]["stage"] if stage_rows else 0
    result = {
        "outcome": outcome,
        "candidate": {"kind": candidate, "version": version, "trained_version": final},
        "baseline": baseline,
        "stages": stage_rows,
        "max_regression_pp": max_regression,
        "min_devices": min_devices,
        "devices": len(devices),
        "serving": {a.device_id: a.release.serving for a in agents},
        "served_candidate": sorted(d for d, times in switches.items() if times),
        "outside_cohort_served": len(outside),
        "timing": {
            "baseline_seconds": round(t_base, 3),
            "rollout_seconds": round(seconds, 3),
        },
        "events": events,
    }
    (out / "rollout.json").write_text(json.dumps(result, indent=1) + "\n")
    say(
        f"rollout: {outcome} at stage {reached} after {seconds:.1f} s; devices outside the "
        f"cohort that served v{version}: {len(outside)}"
    )
    return result


def _switches(agent: EdgeAgent, version: int) -> list[float]:
    """When ``agent`` switched to serving ``version`` (its on-disk history)."""
    history = ServingStore(agent.store.dir).history
    return [float(h["ts"]) for h in history if int(h["version"]) == version]


def _wait_all_serve(agents: list[EdgeAgent], version: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if all(a.release.serving == version for a in agents):
            return
        time.sleep(0.05)
    late = [a.device_id for a in agents if a.release.serving != version]
    raise ConfigError(f"devices {late} do not serve v{version} after {timeout:.0f} s")
