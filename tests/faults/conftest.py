"""Fault-injection suite: each test runs real processes and checks that no acknowledged
update is lost or counted twice. Marked ``faults``; CI runs this bounded version.

Every rig or local fleet a test makes leaves one row of figures (the outcome computed by
``tests/faults/audit.py``, plus the test's own ``notes``) when the test ends, whatever its
result. With ``FEDGE_FAULTS_REPORT=PATH`` set, the rows are written there as JSON at the end
of the session; ``bench/soak/run.py`` renders them into the table of ``docs/reliability.md``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from simulation.broker import MosquittoBroker
from simulation.datasets import FederatedData, make_federated
from tests.faults.local import LocalFleet
from tests.faults.proxy import ChaosProxy
from tests.faults.rig import FaultRig

REPORT_ENV = "FEDGE_FAULTS_REPORT"

# Test (function name, or name[param]) -> (scenario number of issue 6, what it injects).
SCENARIOS: dict[str, tuple[int, str]] = {
    "test_broker_sigkill_mid_round_and_restart": (1, "broker SIGKILL mid-round, back after 1 s"),
    "test_broker_sigterm_and_restart": (2, "broker SIGTERM and restart"),
    "test_broker_sigkill_with_an_update_in_flight_to_the_aggregator": (
        1,
        "broker SIGKILL, an acked update in flight to the aggregator",
    ),
    "test_aggregator_sigkill_around_the_durable_record[before_journal]": (
        3,
        "aggregator SIGKILL before it journals an update",
    ),
    "test_aggregator_sigkill_around_the_durable_record[after_journal]": (
        4,
        "aggregator SIGKILL after the journal, before the ack",
    ),
    "test_device_sigkill_with_an_unacked_update_resends_it_once": (
        5,
        "device SIGKILL with an update in its outbox",
    ),
    "test_resent_round_is_not_trained_again": (5, "device reboot: the resent round not retrained"),
    "test_device_reboot_keeps_residual_and_model": (
        6,
        "device SIGKILL between rounds (top-k + int8, error feedback)",
    ),
    "test_aggregator_offline_beyond_the_broker_queue": (
        7,
        "aggregator offline while devices publish",
    ),
    "test_restarted_aggregator_counts_the_queued_updates": (
        7,
        "aggregator restarted while devices publish",
    ),
    "test_duplicate_delivery_is_counted_once": (8, "duplicate delivery"),
    "test_stale_outbox_entry_after_a_reboot_is_counted_once": (
        8,
        "stale outbox entry resent after a reboot",
    ),
    "test_late_update_is_rejected_and_leaves_the_model_alone": (
        9,
        "late update after the round closed",
    ),
    "test_silent_device_deadline_then_last_will": (10, "device online but never answers"),
    "test_round_short_of_quorum_fails_explicitly": (10, "too few devices answer by the deadline"),
    "test_oversize_update_is_refused_before_sending": (11, "update over the packet limit"),
    "test_chunked_model_survives_a_broker_sigkill": (
        11,
        "model over model_chunk_bytes, broker SIGKILL",
    ),
    "test_latency_and_connection_resets": (12, "latency + random connection resets (proxy)"),
    "test_bounded_soak": (13, "soak: random SIGKILLs of agents, aggregator, broker"),
}

_rows: list[dict[str, Any]] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call":
        item.stash[_RESULT] = "xfailed" if hasattr(rep, "wasxfail") else rep.outcome


_RESULT = pytest.StashKey[str]()


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get(REPORT_ENV)
    if path and _rows:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"rows": _rows, "written": time.time()}, indent=2) + "\n")


def _record(request: pytest.FixtureRequest, made: Any) -> None:
    num, title = SCENARIOS.get(request.node.name, (0, request.node.name))
    try:
        row = made.outcome().as_row()
    except Exception as e:  # the figure must not hide the test's own failure
        row = {"error": f"{type(e).__name__}: {e}"}
    _rows.append(
        {
            "scenario": num,
            "title": title,
            "label": made.label,
            "test": request.node.nodeid,
            "result": request.node.stash.get(_RESULT, "error"),
            **row,
            "notes": dict(made.notes),
        }
    )


@pytest.fixture
def rig_factory(
    fresh_broker: MosquittoBroker, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Any]:
    rigs: list[FaultRig] = []

    def make(**kw: Any) -> FaultRig:
        r = FaultRig(tmp_path / f"rig{len(rigs)}", fresh_broker, **kw)
        rigs.append(r)
        return r

    yield make
    for r in rigs:
        _record(request, r)
        r.stop()


@pytest.fixture
def proxy_factory() -> Iterator[Any]:
    """``make(upstream_port, **chaos) -> ChaosProxy`` (started); stopped after the test."""
    made: list[ChaosProxy] = []

    def make(port: int, **kw: Any) -> ChaosProxy:
        p = ChaosProxy(port, **kw).start()
        made.append(p)
        return p

    yield make
    for p in made:
        p.stop()


@pytest.fixture(scope="session")
def digits4() -> FederatedData:
    return make_federated("digits", 4, "iid", seed=0)


@pytest.fixture
def local_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """``make(broker, data, label=..., **aggregator_config) -> LocalFleet``."""
    fleets: list[LocalFleet] = []

    def make(broker: MosquittoBroker, data: FederatedData, **kw: Any) -> LocalFleet:
        f = LocalFleet(broker, tmp_path / f"fleet{len(fleets)}", data, **kw)
        fleets.append(f)
        return f

    yield make
    for f in fleets:
        _record(request, f)
        f.close()
