"""Attack 6 of issue 17 over a real Mosquitto: devices away while many versions go out.

Devices used to subscribe to models, chunks and tasks at QoS 1 with a one-day persistent
session, so the broker queued every version published while a device was away and replayed
them all on reconnect (37 kB per version per offline session). They now subscribe to those
retained topics at QoS 0: the broker queues nothing for them, and a device that comes back
gets only the retained copies. Broker memory stays flat over the versions.
"""

from __future__ import annotations

import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from paho.mqtt.client import CallbackAPIVersion, Client
from paho.mqtt.enums import MQTTProtocolVersion

from edge_agent.agent import EdgeAgent
from edge_agent.data import LocalData
from edge_agent.store import AgentStore
from fedge.topics import Topics
from fedge.transport.mqtt import BrokerURL, publish_packet_size
from fedge.transport.mux import Mux
from simulation.broker import MosquittoBroker
from tests.integration.fleet_helpers import wait_until

pytestmark = pytest.mark.integration

DEVICES = int(os.environ.get("FEDGE_OFFLINE_DEVICES", "5"))
VERSIONS = int(os.environ.get("FEDGE_OFFLINE_VERSIONS", "60"))
MODEL_BYTES = 37_000  # a version of the digits model, as in the issue
TASK_BYTES = 240


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _agent(mux: Mux, url: BrokerURL, topics: Topics, i: int, tmp: Path, ex: ThreadPoolExecutor):
    rng = np.random.default_rng(i)
    return EdgeAgent(
        device_id=f"dev-{i}",
        mux=mux,
        broker=url,
        topics=topics,
        data=LocalData(rng.normal(size=(8, 64)).astype(np.float32), np.zeros(8, np.int64)),
        store=AgentStore(tmp / f"dev-{i}"),
        executor=ex,
    )


def test_a_device_away_for_many_versions_gets_only_the_newest(
    fresh_broker: MosquittoBroker, tmp_path: Path
) -> None:
    url = BrokerURL.parse(fresh_broker.url)
    topics = Topics(f"t{uuid.uuid4().hex[:8]}")
    mux = Mux("dev").start()
    ex = ThreadPoolExecutor(1)
    pub = Client(
        CallbackAPIVersion.VERSION2, client_id="aggregator", protocol=MQTTProtocolVersion.MQTTv5
    )
    pub.username_pw_set("aggregator")
    try:
        agents = [_agent(mux, url, topics, i, tmp_path, ex) for i in range(DEVICES)]
        for a in agents:
            a.start()
        wait_until(lambda: all(a.session.connected for a in agents), 10, "devices online")
        for a in agents:
            a.stop()  # clean disconnect: the persistent sessions stay on the broker
        wait_until(lambda: not any(a.session.connected for a in agents), 10, "devices away")

        assert fresh_broker.pid is not None
        rss_before = _rss_kb(fresh_broker.pid)
        pub.connect(url.host, url.port)
        pub.loop_start()
        for _ in range(VERSIONS):
            pub.publish(topics.model, os.urandom(MODEL_BYTES), qos=1, retain=True)
            pub.publish(topics.task, os.urandom(TASK_BYTES), qos=1, retain=True).wait_for_publish(
                10
            )
        rss_after = _rss_kb(fresh_broker.pid)

        back = _agent(mux, url, topics, 0, tmp_path, ex)  # the device reboots and reconnects
        back.start()
        newest = publish_packet_size(topics.model, MODEL_BYTES, 0) + publish_packet_size(
            topics.task, TASK_BYTES, 0
        )
        wait_until(lambda: back.counters.rx_bytes >= newest, 10, "the retained model and task")
        time.sleep(1.0)  # anything queued arrives right after the CONNACK, with the retained
        received = back.counters.rx_bytes
        back.stop()
    finally:
        pub.disconnect()
        pub.loop_stop()
        mux.stop()
        ex.shutdown(cancel_futures=True)
    grown = rss_after - rss_before
    print(
        f"\n{DEVICES} devices away, {VERSIONS} versions of {MODEL_BYTES} B: broker RSS "
        f"{rss_before} -> {rss_after} kB (+{grown} kB); a device back received "
        f"{received} B ({received / newest:.1f} x the newest model + task)"
    )
    assert received == newest  # the retained pair only, not O(versions)
    # Queued, Mosquitto keeps one copy of each version shared by the sessions' queues:
    # VERSIONS x MODEL_BYTES (~2.2 MB, measured +2.3 MB); retained, only the newest.
    assert grown < 1024
