"""Shared fixtures: a real Mosquitto started from broker_config/, never a mock."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from simulation.broker import MosquittoBroker, MosquittoNotFound, find_mosquitto
from simulation.datasets import FederatedData
from tests.integration.fleet_helpers import Fleet


def _require_mosquitto() -> None:
    try:
        find_mosquitto()
    except MosquittoNotFound as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """One broker for the whole session; tests keep apart through `prefix`."""
    _require_mosquitto()
    with MosquittoBroker(tmp_path_factory.mktemp("broker")) as started:
        yield started


@pytest.fixture
def fresh_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A broker of the test's own, for tests that kill or restart it."""
    _require_mosquitto()
    with MosquittoBroker(tmp_path / "broker") as started:
        yield started


@pytest.fixture(scope="module")
def sharded_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """A broker with broker_config/acl.sharded: shard workers aggregator-0..3 may read updates."""
    from simulation.broker import CONFIG_DIR

    _require_mosquitto()
    acl = CONFIG_DIR / "acl.sharded"
    with MosquittoBroker(tmp_path_factory.mktemp("sharded-broker"), acl=acl) as started:
        yield started


@pytest.fixture
def prefix() -> str:
    """A topic prefix `fedge/t<8 hex>` (the fleet level) unique to the test."""
    return f"fedge/t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def fleet_factory(broker: MosquittoBroker, tmp_path: Path) -> Iterator[Any]:
    made: list[Fleet] = []

    def make(data: FederatedData, **cfg: Any) -> Fleet:
        f = Fleet(broker, tmp_path, data, **cfg)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()
