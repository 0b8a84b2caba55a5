"""Attack 4 of issue 17 over a real Mosquitto: a burst of signed decompression bombs.

An 8 kB signed update whose zstd frame declares 64 MiB used to be inflated (64 MiB each)
before the tensor check refused it. The frame's declared size is now checked against the
largest blob the round's codec can write for this model, so each bomb is refused before
anything is inflated and the aggregator's peak allocation stays near the model's size.
"""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import zstandard

from fedge.codecs import parse_codec
from fedge.tensors import spec_of
from simulation.datasets import FederatedData, make_federated
from simulation.keys import SimKeys
from tests.integration.fleet_helpers import update_for, wait_until

pytestmark = pytest.mark.integration

BOMBS = 20
DECLARED = 64 * 1024 * 1024


@pytest.fixture(scope="module")
def digits3() -> FederatedData:
    return make_federated("digits", 3, "iid", seed=0)


def test_burst_of_signed_bombs_is_refused_before_inflating(
    fleet_factory: Any, digits3: FederatedData, tmp_path: Path
) -> None:
    keys = SimKeys.make(tmp_path / "keys", 2)
    fleet = fleet_factory(
        digits3,
        rounds=1,
        target_devices=1,
        min_devices=1,
        round_timeout=30,
        codec="fp32+zstd",
        device_keys=keys.registry,
        signing_key=keys.aggregator_key,
    )
    fleet.start_aggregator()
    agg = fleet.aggregator
    honest, mallory = fleet.raw_device("dev-0000"), fleet.raw_device("dev-0001")
    task = honest.wait_task(1)
    model_cap = parse_codec(task.codec).max_blob_bytes(spec_of(agg.weights))
    bomb = zstandard.ZstdCompressor().compress(bytes(DECLARED))  # ~2 kB on the wire
    payload = update_for(
        agg.weights, "dev-0001", task, keys.device_keys[1], codec=task.codec, delta=bomb
    )
    tracemalloc.start()
    try:
        started = time.monotonic()
        for _ in range(BOMBS):
            mallory.send(payload)
        wait_until(lambda: sum(agg.metrics.rejected.values()) >= BOMBS, 30, "the bombs")
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(
        f"\n{BOMBS} signed bombs ({len(payload)} B, declaring {DECLARED >> 20} MiB; model cap "
        f"{model_cap} B): peak traced {peak / 2**20:.1f} MiB, {elapsed:.2f} s"
    )
    try:
        honest.send(update_for(agg.weights, "dev-0000", task, keys.device_keys[0]))
        wait_until(agg.done.is_set, 20, "the honest round")
    finally:
        honest.close()
        mallory.close()
    assert model_cap < 1024 * 1024  # the digits MLP: about 20 kB
    assert dict(agg.metrics.rejected) == {"too_large": BOMBS}
    # Not one bomb was inflated: inflating one costs DECLARED bytes at once.
    assert peak < 16 * 1024 * 1024
