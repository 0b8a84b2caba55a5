"""The live view's pure parts: round outcomes, bounded memory, the snapshot hand-over."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from aggregator.config import AggregatorConfig, ModelConfig
from aggregator.observe.fleetview import FleetSnapshot, FleetView
from aggregator.observe.prometheus import FleetCollector, round_outcome
from aggregator.observe.server import Snapshots, dashboard_html
from aggregator.service import Aggregator
from fedge.envelopes import DeviceState, DeviceStatus
from fedge.transport.memory import ManualLoop, MemoryBroker

ONLINE, OFFLINE = DeviceState.ONLINE, DeviceState.OFFLINE


class InlineLoop:
    """Runs what it is handed at once, on the caller's thread; or never (``stalled``)."""

    def __init__(self, stalled: bool = False) -> None:
        self.stalled = stalled
        self.calls = 0

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        self.calls += 1
        if not self.stalled:
            fn(*args)

    def call_later(self, delay: float, fn: Callable[[], Any]) -> Any:
        raise NotImplementedError


def snapshot(**over: Any) -> FleetSnapshot:
    base: dict[str, Any] = {
        "fleet": "f",
        "mode": "sync",
        "strategy": "fedavg",
        "codec": "fp32",
        "version": 0,
        "rounds_goal": 0,
        "failed_rounds": 0,
        "devices": (),
        "open_round": None,
        "history": (),
        "accepted": 0,
        "rejected": (),
        "uplink_bytes": 0,
    }
    return FleetSnapshot(**{**base, **over})


def test_round_outcomes_keep_the_kind_of_failure_not_its_numbers() -> None:
    assert round_outcome({"round": 3, "version": 2}) == "published"
    assert round_outcome({"round": 4, "failed": "quorum not met: 1 of 2 by deadline"}) == (
        "quorum_not_met"
    )
    assert round_outcome({"round": 5, "failed": "aggregation failed: too few"}) == (
        "aggregation_failed"
    )
    assert round_outcome({"round": 6, "failed": "something new"}) == "failed"


def test_the_view_keeps_a_bounded_history_and_device_table() -> None:
    view = FleetView(history=5, max_devices=3)
    for i in range(10):
        view.received(f"dev-{i}", 100 + i)
        view.reject("bad_msgpack", device=f"dev-{i}")
        view.write({"round": i + 1, "version": i + 1, "counted": {"dev-0": "u"}, "ts": 0.0})

    assert [r.round for r in view._history] == [6, 7, 8, 9, 10]
    assert sorted(view._devices) == ["dev-0", "dev-1", "dev-2"]
    assert view._devices["dev-0"].rounds_counted == 10
    assert view.rejected["bad_msgpack"] == 10  # the totals still count every device
    assert view.uplink_bytes == sum(range(100, 110))


def test_snapshots_are_built_on_the_loop_once_per_max_age() -> None:
    loop = InlineLoop()
    built: list[FleetSnapshot] = []

    def build() -> FleetSnapshot:
        built.append(snapshot(version=len(built)))
        return built[-1]

    snaps = Snapshots(loop, build, max_age=60.0)

    first = snaps.get()
    again = snaps.get()

    assert first is again is built[0]
    assert loop.calls == 1


def test_a_loop_that_does_not_answer_costs_a_bounded_wait_and_serves_nothing_stale() -> None:
    loop = InlineLoop(stalled=True)
    snaps = Snapshots(loop, snapshot, timeout=0.2)

    result = [snaps.get(), snaps.get()]

    assert result == [None, None]
    assert loop.calls == 2  # a request that was never run is asked again, not waited on forever


def test_the_page_inlines_the_snapshot_without_letting_a_device_id_close_the_script() -> None:
    from aggregator.observe.fleetview import DeviceRow

    evil = DeviceRow("</script><b>x", "online", None, None, 0, None, ())
    page = dashboard_html(snapshot(devices=(evil,))).decode()

    assert "</script><b>" not in page
    inline = re.search(r"const INITIAL = (.*);\n", page)
    assert inline is not None
    assert json.loads(inline.group(1))["devices"][0]["device"] == "</script><b>x"


class RevokedOnly:
    """A key ring that has revoked exactly ``devices``."""

    def __init__(self, *devices: str) -> None:
        self.devices = set(devices)

    def is_revoked(self, device: str) -> bool:
        return device in self.devices


def test_device_states_in_the_snapshot_and_the_gauges(tmp_path: Path) -> None:
    config = AggregatorConfig(
        broker="mqtt://127.0.0.1:1",
        fleet="f",
        state_dir=tmp_path / "aggregator",
        model=ModelConfig(name="logreg", input_dim=8, num_classes=3),
    )
    loop = ManualLoop()
    agg = Aggregator(config, loop, session_factory=MemoryBroker().session)
    agg.start()
    view = FleetView()
    for d, state in (("dev-a", ONLINE), ("dev-b", OFFLINE), ("dev-c", ONLINE)):
        agg.presence.update(d, DeviceStatus(d, state, 0, 1000.0))
    view.received("dev-d", 42)  # sent an update, never a status
    view.reject("bad_signature", device="dev-d")

    snap = view.snapshot(
        config=config, presence=agg.presence, rounds=agg.rounds, keyring=RevokedOnly("dev-c")
    )

    states = {d.device: d.state for d in snap.devices}
    assert states == {
        "dev-a": "online",
        "dev-b": "offline",
        "dev-c": "revoked",
        "dev-d": ("unannounced"),
    }
    assert snap.devices[3].rejected == (("bad_signature", 1),)
    assert snap.devices[3].last_update_bytes == 42
    registry = CollectorRegistry()
    registry.register(FleetCollector(lambda: snap))
    text = generate_latest(registry).decode()
    for state, n in (("online", 1), ("offline", 1), ("revoked", 1), ("unannounced", 1)):
        assert f'fedge_devices{{state="{state}"}} {n:.1f}' in text
    assert 'fedge_devices{state="known"} 3.0' in text
    assert "fedge_round_open 1.0" in text  # the memory broker connected it: round 1 opened
    assert "fedge_round_id 1.0" in text
    assert "fedge_round_target_updates 10.0" in text
    agg.stop()
    loop.run()
