"""The shipped ACL (broker_config/acl) and secure rounds, on a real Mosquitto: a device writes
only its own four stage topics, reads the stage announcements and its own inbox, and nothing
of another device's."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import pytest
from paho.mqtt.client import CallbackAPIVersion, Client
from paho.mqtt.enums import MQTTProtocolVersion

from fedge.topics import SECAGG_STAGES, Topics
from simulation.broker import MosquittoBroker

pytestmark = pytest.mark.integration

NOT_AUTHORIZED = 0x87


class Peer:
    def __init__(self, broker: MosquittoBroker, name: str) -> None:
        host, port = broker.url.removeprefix("mqtt://").split(":")
        self.got: queue.Queue[str] = queue.Queue()
        self.codes: dict[int, int] = {}
        self.acked = threading.Condition()
        self.c = Client(
            CallbackAPIVersion.VERSION2, client_id=name, protocol=MQTTProtocolVersion.MQTTv5
        )
        self.c.username_pw_set(name)
        self.c.on_message = lambda _c, _u, m: self.got.put(m.topic)
        self.c.on_publish = self._on_publish
        self.c.connect(host, int(port))
        self.c.loop_start()

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: Any, _p: Any) -> None:
        with self.acked:
            self.codes[mid] = rc.value
            self.acked.notify_all()

    def publish(self, topic: str) -> int:
        info = self.c.publish(topic, b"x", qos=1)
        with self.acked:
            assert self.acked.wait_for(lambda: info.mid in self.codes, 5)
            return self.codes[info.mid]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_devices_use_their_own_secagg_topics_only(broker: MosquittoBroker, prefix: str) -> None:
    t = Topics(prefix.split("/")[1])
    a, b, agg = Peer(broker, "sa-dev-a"), Peer(broker, "sa-dev-b"), Peer(broker, "aggregator")
    try:
        a.c.subscribe(f"{t.prefix}/#", qos=1)
        time.sleep(0.3)
        for stage in SECAGG_STAGES:
            assert a.publish(t.secagg(stage, "sa-dev-a")) < 0x80
            assert a.publish(t.secagg(stage, "sa-dev-b")) == NOT_AUTHORIZED
            assert b.publish(t.secagg(stage, "sa-dev-b")) < 0x80
        assert a.publish(t.secagg_stage) == NOT_AUTHORIZED
        assert a.publish(t.inbox("sa-dev-b")) == NOT_AUTHORIZED
        assert a.publish(t.inbox("sa-dev-a")) == NOT_AUTHORIZED
        for topic in (t.secagg_stage, t.inbox("sa-dev-a"), t.inbox("sa-dev-b")):
            assert agg.publish(topic) < 0x80
        time.sleep(0.5)
        seen = set()
        while not a.got.empty():
            seen.add(a.got.get())
        # Its own inbox and the stage announcements; not b's inbox nor b's stage messages.
        assert seen == {t.secagg_stage, t.inbox("sa-dev-a")}
    finally:
        for p in (a, b, agg):
            p.close()
