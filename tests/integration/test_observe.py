"""The live view over a real fleet and a real Mosquitto: Prometheus /metrics, the fleet JSON,
and the dashboard page as headless Chromium renders it."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from aggregator.config import HyperConfig
from fedge.errors import ConfigError
from simulation.broker import MosquittoBroker
from simulation.datasets import FederatedData, make_federated
from simulation.fleet import DelayedExecutor
from tests.integration.fleet_helpers import Fleet, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def digits3() -> FederatedData:
    return make_federated("digits", 3, "iid", seed=0)


def get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status, r.headers["Content-Type"], r.read()


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    _, ctype, body = get(url + "metrics")
    assert ctype.startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def started(
    fleet_factory: Any, data: FederatedData, delays: tuple[float, ...] = (), **cfg: Any
) -> Any:
    """Three agents; with ``delays``, agent i holds its result back ``delays[i]`` seconds (a
    timer, as ``fedge simulate --device-delay``), so rounds stay open long enough to watch."""
    fleet = fleet_factory(
        data,
        metrics_port=0,
        target_devices=3,
        min_devices=3,
        round_timeout=30,
        **{"hyper": HyperConfig(epochs=1), **cfg},
    )
    fleet.start_aggregator()
    for i in range(3):
        if delays:
            fleet.add_agent(i, executor=DelayedExecutor(fleet.executor, fleet.dev_mux, delays[i]))
        else:
            fleet.add_agent(i)
    return fleet


def test_metrics_count_what_the_fleet_did(fleet_factory: Any, digits3: FederatedData) -> None:
    fleet = started(fleet_factory, digits3, rounds=3)
    agg = fleet.aggregator
    assert agg.web is not None
    url = agg.web.url
    assert url.startswith("http://127.0.0.1:")

    wait_until(lambda: len(agg.online) == 3, 20, "three devices online")
    live = scrape(url)
    assert live[("fedge_devices", (("state", "online"),))] == 3
    wait_until(lambda: agg.done.is_set(), 60, "three versions")
    # Counters are live; gauges come from a snapshot at most max_age (0.5 s) old.
    version = ("fedge_model_version", ())
    wait_until(lambda: scrape(url).get(version) == 3, 5, "the gauges to catch up")
    m = scrape(url)

    records = fleet.records
    assert m[("fedge_rounds_total", (("outcome", "published"),))] == agg.version == 3
    accepted = m[("fedge_updates_total", (("reason", ""), ("result", "accepted")))]
    assert accepted == sum(r["devices"] for r in records) == 9
    up = m[("fedge_bytes_total", (("codec", "fp32"), ("direction", "up"), ("kind", "update")))]
    assert up == sum(r["uplink_bytes"] for r in records) > 0
    down = m[("fedge_bytes_total", (("codec", "onnx"), ("direction", "down"), ("kind", "model")))]
    assert down == sum(r["model_bytes"] for r in records) > 0
    assert m[("fedge_round_duration_seconds_count", ())] == 3
    assert m[("fedge_central_accuracy", ())] == pytest.approx(records[-1]["accuracy"])
    assert m[("fedge_central_loss", ())] == pytest.approx(records[-1]["loss"])
    assert m[("fedge_devices", (("state", "known"),))] == 3
    assert m[("fedge_journal_append_seconds_count", ())] == 9
    assert m[("fedge_checkpoint_write_seconds_count", ())] >= 3
    assert m[("fedge_update_staleness_versions_count", ())] == 9

    _, ctype, body = get(url + "api/fleet")
    snap = json.loads(body)
    assert ctype == "application/json"
    assert [d["device"] for d in snap["devices"]] == ["dev-0", "dev-1", "dev-2"]
    assert all(d["rounds_counted"] == 3 and d["last_update_bytes"] > 0 for d in snap["devices"])
    assert [r["version"] for r in snap["history"]] == [1, 2, 3]


def test_two_services_in_one_process_keep_their_own_metrics(
    broker: MosquittoBroker, fresh_broker: MosquittoBroker, tmp_path: Path, digits3: FederatedData
) -> None:
    # Two brokers: two aggregators of one broker share the client id and kick each other off.
    a = Fleet(broker, tmp_path / "a", digits3, metrics_port=0, rounds=1)
    b = Fleet(fresh_broker, tmp_path / "b", digits3, metrics_port=0, rounds=1)
    raw = None
    try:
        a.start_aggregator()
        b.start_aggregator()
        assert a.aggregator.web is not None
        assert b.aggregator.web is not None
        raw = a.raw_device("dev-x")
        raw.wait_task(1)
        raw.send(b"\xc1 not msgpack")
        key = ("fedge_updates_total", (("reason", "bad_msgpack"), ("result", "rejected")))
        wait_until(lambda: scrape(a.aggregator.web.url).get(key) == 1, 10, "the rejection")
        assert key not in scrape(b.aggregator.web.url)
        with pytest.raises(urllib.error.HTTPError, match="404"):
            get(a.aggregator.web.url + "nothing-here")
    finally:
        if raw is not None:
            raw.close()
        a.close()
        b.close()


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip(
            "chromium not found (scripts/ensure-test-tools.sh installs Debian's package as root)"
        )
    return exe


def headless(exe: str, tmp: Path, *args: str) -> str:
    """Run headless Chromium on loopback only; its stdout."""
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp / 'chromium-profile'}",
        *args,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_dashboard_shows_the_fleet_and_its_rounds_in_chromium(
    fleet_factory: Any, digits3: FederatedData, tmp_path: Path
) -> None:
    exe = chromium()
    # Rounds of about a second, one device late in each: the page sees an open round.
    fleet = started(fleet_factory, digits3, delays=(0.1, 0.3, 1.0), rounds=20)
    agg = fleet.aggregator
    assert agg.web is not None
    wait_until(lambda: agg.version >= 2, 60, "two versions")
    wait_until(lambda: agg.rounds.strategy.count >= 1, 10, "an update in the open round")

    dom = headless(exe, tmp_path, "--dump-dom", agg.web.url)

    for dev in ("dev-0", "dev-1", "dev-2"):
        assert f'<tr data-device="{dev}">' in dom
    rounds = re.search(r'id="chart-quality"[^>]*data-rounds="([0-9,]*)"', dom)
    assert rounds is not None
    assert len(rounds.group(1).split(",")) >= 2
    assert dom.count('class="pt-accuracy"') >= 2
    bars = re.search(r'id="chart-bytes"[^>]*data-rounds="([0-9,]*)"', dom)
    assert bars is not None
    assert {"1", "2"} <= set(bars.group(1).split(","))
    assert "online" in dom
    assert re.search(r'id="round-count">\d+ / 3 counted<', dom)

    shot = tmp_path / "dashboard.png"
    headless(exe, tmp_path, f"--screenshot={shot}", "--window-size=1280,900", agg.web.url)
    assert shot.stat().st_size > 10_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_taken_metrics_port_is_one_clear_error(
    broker: MosquittoBroker, tmp_path: Path, digits3: FederatedData
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        fleet = Fleet(broker, tmp_path, digits3, metrics_port=port, rounds=1)
        try:
            with pytest.raises(ConfigError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
                fleet.start_aggregator()
        finally:
            fleet.close()


def test_a_restarted_aggregator_serves_on_the_same_port_again(
    broker: MosquittoBroker, tmp_path: Path, digits3: FederatedData
) -> None:
    with socket.socket() as probe:  # a port that is free now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fleet = Fleet(broker, tmp_path, digits3, metrics_port=port, rounds=2)
    try:
        fleet.start_aggregator()
        key = ("fedge_round_id", ())
        url = f"http://127.0.0.1:{port}/"
        wait_until(lambda: scrape(url).get(key) == 1, 10, "round 1 served")

        fleet.restart_aggregator()

        # The new process's round (the resumed one) is served on the same port.
        wait_until(lambda: scrape(url).get(key) == 1, 10, "round 1 served after the restart")
        assert fleet.aggregator.web is not None
        assert fleet.aggregator.web.port == port
    finally:
        fleet.close()
