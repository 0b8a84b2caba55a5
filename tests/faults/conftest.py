"""Fault-injection suite: each test runs real processes and checks that no acknowledged
update is lost or counted twice. Marked ``faults``; CI runs this bounded version."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from simulation.broker import MosquittoBroker
from tests.faults.rig import FaultRig


@pytest.fixture
def rig_factory(fresh_broker: MosquittoBroker, tmp_path: Path) -> Iterator[object]:
    rigs: list[FaultRig] = []

    def make(**kw: object) -> FaultRig:
        r = FaultRig(tmp_path, fresh_broker, **kw)  # type: ignore[arg-type]
        rigs.append(r)
        return r

    yield make
    for r in rigs:
        r.stop()
