"""The aggregator service as the reducer of shard workers, over a real Mosquitto with
``broker_config/acl.sharded``: its model is the FedAvg that numpy computes from the same
updates, every device gets its receipt from the worker that journaled it, and a fleet of real
agents trains through two workers."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from aggregator.sharded.worker import ShardWorker, WorkerConfig
from fedge.codecs import parse_codec
from fedge.errors import ConfigError
from fedge.transport.mux import Mux
from simulation.broker import MosquittoBroker
from simulation.datasets import make_federated
from tests.integration.fleet_helpers import Fleet, update_for, wait_until

pytestmark = pytest.mark.integration

WAIT = 30.0
WORKERS = ("aggregator-0", "aggregator-1")


def _start_workers(fleet: Fleet, tmp: Path) -> tuple[Mux, list[ShardWorker]]:
    mux = Mux("shards").start()
    workers = []
    for name in WORKERS:
        cfg = WorkerConfig(str(fleet.url), fleet.topics.fleet, name, tmp / name)
        w = ShardWorker(cfg, mux)
        w.start()
        workers.append(w)
    return mux, workers


def _stop_workers(mux: Mux, workers: list[ShardWorker]) -> None:
    for w in workers:
        w.stop()
    time.sleep(0.2)
    mux.stop()


def test_the_reducer_service_publishes_numpy_fedavg_of_the_workers_shares(
    sharded_broker: MosquittoBroker, tmp_path: Path
) -> None:
    data = make_federated("digits", 6, "iid", 0, 0.2)
    fleet = Fleet(
        sharded_broker,
        tmp_path,
        data,
        codec="fp32",
        shard_workers=WORKERS,
        shard_poll=0.2,
        target_devices=6,
        min_devices=6,
        round_timeout=WAIT,
        rounds=1,
    )
    fleet.start_aggregator()
    mux, workers = _start_workers(fleet, tmp_path)
    devices = [fleet.raw_device(f"dev-{i}") for i in range(6)]
    try:
        base = {k: v.copy() for k, v in fleet.aggregator.weights.items()}
        for w in workers:
            assert w.ready.wait(WAIT), f"{w.name} never held the model and the task"
        rng = np.random.default_rng(3)
        codec = parse_codec("fp32")
        sent: dict[str, tuple[dict[str, np.ndarray], int]] = {}
        for i, dev in enumerate(devices):
            task = dev.wait_task(1)
            delta = {k: rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in base.items()}
            n = 10 + 7 * i
            blob = codec.encode(delta)
            dev.send(update_for(base, dev.device_id, task, delta=blob, num_samples=n))
            sent[dev.device_id] = (delta, n)
        wait_until(lambda: fleet.aggregator.done.is_set(), WAIT, "the sharded round to close")

        total = sum(n for _, n in sent.values())
        expected = {
            k: (base[k] + sum(d[k].astype(np.float64) * n for d, n in sent.values()) / total)
            for k in base
        }
        got = fleet.aggregator.weights
        for k in base:
            np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-6)
        assert not np.allclose(got["fc1.weight"], base["fc1.weight"])  # the step was taken

        rec = fleet.records[-1]
        assert sorted(rec["counted"]) == sorted(sent)
        assert rec["samples"] == total
        assert rec["devices"] == 6
        assert sum(w.folded for w in workers) == 6
        assert all(w.folded >= 1 for w in workers), "the shared subscription split nothing"
        line = json.loads(fleet.config.metrics_path.read_text().splitlines()[-1])
        assert line["version"] == 1
        for d in devices:
            wait_until(lambda d=d: len(d.receipts) >= 1, WAIT, "a receipt from a shard worker")
            assert [r.round for r in d.receipts] == [1]
    finally:
        for d in devices:
            d.close()
        _stop_workers(mux, workers)
        fleet.close()


def _train_fleet(
    broker: MosquittoBroker, tmp: Path, *, sharded: bool
) -> tuple[list[dict], dict[str, np.ndarray]]:
    data = make_federated("digits", 4, "iid", 0, 0.2)
    extra = {"shard_workers": WORKERS, "shard_poll": 0.2} if sharded else {}
    fleet = Fleet(
        broker,
        tmp,
        data,
        target_devices=4,
        min_devices=2,
        round_timeout=WAIT,
        rounds=3,
        **extra,
    )
    fleet.start_aggregator()
    mux, workers = _start_workers(fleet, tmp) if sharded else (None, [])
    try:
        for i in range(4):
            fleet.add_agent(i)
        wait_until(lambda: fleet.aggregator.done.is_set(), 3 * WAIT, "three rounds")
        # Receipts (from the workers, when sharded) drain the agents' outboxes.
        for a in fleet.agents.values():
            wait_until(lambda a=a: not list(a.outbox.pending()), WAIT, "outbox drained")
        return fleet.records, dict(fleet.aggregator.weights)
    finally:
        if mux is not None:
            _stop_workers(mux, workers)
        fleet.close()


def test_agents_training_through_two_shard_workers_get_the_single_aggregators_model(
    sharded_broker: MosquittoBroker, tmp_path: Path
) -> None:
    single, w_single = _train_fleet(sharded_broker, tmp_path / "single", sharded=False)
    shard, w_shard = _train_fleet(sharded_broker, tmp_path / "sharded", sharded=True)
    assert [sorted(r["counted"]) for r in shard] == [sorted(r["counted"]) for r in single]
    assert all(r["devices"] == 4 for r in shard)
    for k in w_single:
        np.testing.assert_allclose(w_shard[k], w_single[k], rtol=1e-5, atol=1e-6)
    for a, b in zip(single, shard, strict=True):
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=1e-3)
    assert shard[-1]["accuracy"] > shard[0]["accuracy"] > 0.1  # it learns (chance: 0.1)


def test_a_strategy_that_needs_every_update_is_refused_when_sharded(
    sharded_broker: MosquittoBroker, tmp_path: Path
) -> None:
    data = make_federated("digits", 3, "iid", 0, 0.2)
    with pytest.raises(ConfigError, match="cannot run sharded"):
        Fleet(sharded_broker, tmp_path, data, strategy="median", shard_workers=WORKERS)


def test_shard_worker_processes_from_the_cli_serve_the_reducer_service(
    sharded_broker: MosquittoBroker, tmp_path: Path
) -> None:
    """`fedge shard-worker` as OS processes (password from a file), the service as their
    reducer: a round of four updates closes with all four counted, and SIGTERM stops each
    worker cleanly."""
    import signal
    import subprocess
    import sys

    data = make_federated("digits", 4, "iid", 0, 0.2)
    fleet = Fleet(
        sharded_broker,
        tmp_path,
        data,
        shard_workers=WORKERS,
        shard_poll=0.2,
        target_devices=4,
        min_devices=4,
        round_timeout=WAIT,
        rounds=1,
    )
    fleet.start_aggregator()
    (tmp_path / "pw").write_text("not-checked-by-the-local-broker\n")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "fedge_cli.main", "shard-worker", "--broker", str(fleet.url),
             "--fleet", fleet.topics.fleet, "--worker", name, "--state-dir",
             str(tmp_path / name), "--password-file", str(tmp_path / "pw"),
             "--metrics-port", "0"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in WORKERS
    ]  # fmt: skip
    # Each worker prints its name, then where its Prometheus metrics are.
    heads = [[p.stdout.readline(), p.stdout.readline()] for p in procs]  # type: ignore[union-attr]
    urls = [h[1].split()[-1] for h in heads]
    assert all(u.startswith("http://127.0.0.1:") and u.endswith("/metrics") for u in urls), heads
    devices = [fleet.raw_device(f"dev-{i}") for i in range(4)]
    try:
        base = dict(fleet.aggregator.weights)
        for d in devices:
            d.send(update_for(base, d.device_id, d.wait_task(1)))
        wait_until(lambda: fleet.aggregator.done.is_set(), WAIT, "the round through processes")
        assert sorted(fleet.records[-1]["counted"]) == [d.device_id for d in devices]
        for d in devices:
            wait_until(lambda d=d: len(d.receipts) == 1, WAIT, "a receipt from a worker process")
        # The workers' own counters: together they took the four updates.
        accepted = up = 0.0
        for url in urls:
            text = urllib.request.urlopen(url, timeout=5).read().decode()
            for fam in text_string_to_metric_families(text):
                for smp in fam.samples:
                    if smp.name == "fedge_updates_total" and smp.labels["result"] == "accepted":
                        accepted += smp.value
                    if smp.name == "fedge_bytes_total" and smp.labels["direction"] == "up":
                        up += smp.value
        assert accepted == 4
        assert up > 0
    finally:
        for d in devices:
            d.close()
        for p in procs:
            p.send_signal(signal.SIGTERM)
        outs = [
            "".join(h) + p.communicate(timeout=WAIT)[0] for h, p in zip(heads, procs, strict=True)
        ]
        fleet.close()
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all("fedge shard-worker aggregator-" in o for o in outs), outs


def test_workers_must_enforce_what_the_aggregator_requires(
    sharded_broker: MosquittoBroker, tmp_path: Path
) -> None:
    """An aggregator that requires signed updates takes partials only from workers that
    check signatures: with plain workers its round waits (and says why); with workers that
    hold the key registry the signed fleet trains."""
    from aggregator.keyring import KeyRing
    from simulation.keys import SimKeys

    keys = SimKeys.make(tmp_path / "keys", 3)
    for i in range(3):  # the Fleet's devices are dev-0..dev-2, the registry's dev-0000..
        (keys.registry / "devices" / f"dev-{i:04d}.pub").rename(
            keys.registry / "devices" / f"dev-{i}.pub"
        )
    data = make_federated("digits", 3, "iid", 0, 0.2)

    def run(keyring: KeyRing | None, sub: str) -> tuple[Fleet, Callable[[], None]]:
        fleet = Fleet(
            sharded_broker,
            tmp_path / sub,
            data,
            shard_workers=WORKERS,
            shard_poll=0.2,
            target_devices=3,
            min_devices=3,
            round_timeout=WAIT,
            rounds=1,
            device_keys=keys.registry,
        )
        fleet.start_aggregator()
        mux = Mux("shards").start()
        workers = [
            ShardWorker(
                WorkerConfig(str(fleet.url), fleet.topics.fleet, n, tmp_path / sub / n),
                mux,
                keyring=keyring,
            )
            for n in WORKERS
        ]
        for w in workers:
            w.start()
        for i in range(3):
            fleet.add_agent(i, signing_key=keys.device_keys[i])
        return fleet, lambda: _stop_workers(mux, workers)

    plain, stop = run(None, "plain")
    try:
        sharded = plain.aggregator.sharded
        assert sharded is not None
        wait_until(lambda: len(sharded.reducer.refused) == 2, WAIT, "partials refused")
        assert "signed=False" in sharded.reducer.refused["aggregator-0"]
        assert plain.aggregator.version == 0
    finally:
        stop()
        plain.close()

    checked, stop = run(KeyRing(keys.registry), "checked")
    try:
        wait_until(lambda: checked.aggregator.done.is_set(), WAIT, "a signed sharded round")
        assert len(checked.records[-1]["counted"]) == 3
    finally:
        stop()
        checked.close()


def test_fedge_simulate_with_shard_workers(tmp_path: Path) -> None:
    """`fedge simulate --shard-workers 2`: the whole loop, signed, through two workers."""
    from simulation.fleet import SimConfig, simulate

    summary = simulate(
        SimConfig(out=tmp_path, devices=4, rounds=2, epochs=1, shard_workers=2),
        say=lambda _s: None,
    )
    assert (summary["rounds"], summary["failed_rounds"]) == (2, 0)
    assert sorted(summary["shard_workers"]) == list(WORKERS)
    assert sum(summary["shard_workers"].values()) == 8  # 4 devices x 2 rounds, once each
    assert summary["rejected"] == {}
