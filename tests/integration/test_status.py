"""`fedge status` over a real Mosquitto with broker_config/acl: the devices and the open round
as the read-only monitor identity sees them, without disturbing the aggregator."""

from __future__ import annotations

import re
import threading
from typing import Any

import pytest
from paho.mqtt.client import CallbackAPIVersion, Client
from paho.mqtt.enums import MQTTProtocolVersion

from fedge.transport.mqtt import BrokerURL
from fedge_cli.main import main
from fedge_cli.status import read_fleet
from simulation.broker import MosquittoBroker
from simulation.datasets import make_federated
from tests.integration.fleet_helpers import RawDevice, wait_until

pytestmark = pytest.mark.integration


def test_status_lists_the_devices_and_the_open_round_and_leaves_the_aggregator_alone(
    fleet_factory: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_federated("digits", 3, "iid", seed=0)
    # A round that cannot close (quorum 3, two devices): it stays open while we look.
    fleet = fleet_factory(data, rounds=3, target_devices=3, min_devices=3, round_timeout=60)
    fleet.start_aggregator()
    fleet.add_agent(0)
    fleet.add_agent(1)
    agg = fleet.aggregator
    wait_until(lambda: len(agg.online) == 2 and agg.round is not None, 20, "two devices, a round")
    # Its last status names the model it holds: let v0 reach it first (it raced the stop).
    wait_until(lambda: fleet.agents["dev-1"].model is not None, 10, "dev-1 holds v0")
    fleet.agents["dev-1"].stop()
    wait_until(lambda: agg.online == {"dev-0"}, 10, "dev-1 offline")
    connects = agg.session.connects  # a client taking its id over would force a reconnect

    main(["status", "--broker", str(fleet.url), "--fleet", fleet.topics.fleet, "--wait", "1"])

    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(
        rf"fleet {fleet.topics.fleet}: round 1 open on v0, deadline in \d+ s, codec fp32, "
        r"asks all devices",
        out[0],
    ), out
    assert out[1].split() == ["DEVICE", "STATE", "MODEL", "LAST", "SEEN", "ASKED"]
    assert out[2].split()[:2] == ["dev-0", "online"]
    assert out[3].split()[:3] == ["dev-1", "offline", "v0"]
    assert out[-1] == "2 devices: 1 online, 1 offline"
    # The aggregator kept its session: never dropped, the same round open.
    assert agg.session.connected
    assert agg.session.connects == connects
    assert agg.round is not None
    assert agg.round.round == 1


def test_status_refuses_to_connect_as_the_aggregator(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["status", "--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--username",
              "aggregator"])  # fmt: skip

    assert e.value.code == 2  # a user error: one line, exit 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "never connects as aggregator" in err[0]


def test_the_monitor_identity_reads_statuses_and_can_write_nothing(
    broker: MosquittoBroker, prefix: str
) -> None:
    url = BrokerURL.parse(broker.url)
    device = RawDevice(url.host, url.port, "dev-1", prefix)
    device.client.publish(f"{prefix}/status/dev-1", b"online", qos=1, retain=True).wait_for_publish(
        5
    )
    outcome: dict[int, bool] = {}
    got: list[str] = []
    acked = threading.Event()
    monitor = Client(
        CallbackAPIVersion.VERSION2, client_id="monitor", protocol=MQTTProtocolVersion.MQTTv5
    )
    monitor.username_pw_set("monitor")

    def on_publish(_c: Any, _u: Any, mid: int, rc: Any, _p: Any) -> None:
        outcome[mid] = rc.is_failure
        acked.set()

    monitor.on_publish = on_publish
    monitor.on_message = lambda _c, _u, m: got.append(m.topic)
    monitor.connect(url.host, url.port)
    monitor.loop_start()
    try:
        monitor.subscribe([(f"{prefix}/status/+", 1)])
        wait_until(lambda: got == [f"{prefix}/status/dev-1"], 5, "the retained device status")
        for topic in ("update/monitor", "status/monitor", "round/current", "model/global"):
            acked.clear()
            info = monitor.publish(f"{prefix}/{topic}", b"x", qos=1)
            assert acked.wait(5)
            assert outcome[info.mid], f"monitor may publish on {topic}"
    finally:
        monitor.loop_stop()
        monitor.disconnect()
        device.close()


def test_each_device_announces_every_new_model_it_holds(fleet_factory: Any) -> None:
    # Prepare: two rounds, so each device receives v0, v1 and v2 while it stays connected
    data = make_federated("digits", 2, "iid", seed=0)
    fleet = fleet_factory(data, rounds=2, target_devices=2, min_devices=2, round_timeout=30)
    fleet.start_aggregator()
    fleet.add_agent(0)
    fleet.add_agent(1)
    agg = fleet.aggregator
    # Execute
    wait_until(agg.done.is_set, 60, "two versions")
    # Assert: the retained statuses name v2 without a reconnect: `fedge status` is current
    seen: dict[str, int | None] = {}

    def current() -> bool:
        got = read_fleet(str(fleet.url), fleet.topics.fleet, wait=0.3)
        seen.update({d: s.version for d, s in got.statuses.items()})
        return seen == {"dev-0": 2, "dev-1": 2}

    wait_until(current, 10, "statuses naming v2")
    assert all(a.session.connects == 1 for a in fleet.agents.values())
