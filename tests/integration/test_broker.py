"""The broker config and ACL, checked against a real Mosquitto with paho-mqtt MQTT 5.

Absence of a message is never checked by sleeping: a later message that must arrive
(a sentinel on the same path) bounds the wait, because Mosquitto delivers in order.
"""

from __future__ import annotations

import queue
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from simulation.broker import BROKER_MAX_PACKET_SIZE, CONFIG_DIR, MosquittoBroker

pytestmark = pytest.mark.integration

WAIT = 30.0  # generous: a loaded 2-core CI box saves the broker DB on every change
NOT_AUTHORIZED = 0x87
# MQTT 5 PUBACK: 0x10 "no matching subscribers" is a success too (any code < 0x80).
ACCEPTED = (0x00, 0x10)
GRANTED_QOS1 = 0x01


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool


class Peer:
    """A paho client with bounded waits; username is also the client id."""

    def __init__(
        self,
        broker: MosquittoBroker,
        username: str | None,
        *,
        clean_start: bool = True,
        session_expiry: int | None = None,
    ) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=username or "", protocol=mqtt.MQTTv5
        )
        if username is not None:
            self.client.username_pw_set(username)
        self.messages: queue.Queue[Received] = queue.Queue()
        self.connack: ReasonCode | None = None
        self.session_present = False
        self._connected = threading.Event()
        self._lock = threading.Condition()
        self._pubacks: dict[int, ReasonCode] = {}
        self._subacks: dict[int, list[ReasonCode]] = {}
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        properties = None
        if session_expiry is not None:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = session_expiry
        self.client.connect(
            broker.host, broker.port, clean_start=clean_start, properties=properties
        )
        self.client.loop_start()
        if not self._connected.wait(WAIT):
            self.close()
            raise AssertionError(f"no CONNACK for {username!r} within {WAIT}s")

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self.connack = reason_code
        self.session_present = bool(flags.session_present)
        self._connected.set()

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties,
    ) -> None:
        with self._lock:
            self._pubacks[mid] = reason_code
            self._lock.notify_all()

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties,
    ) -> None:
        with self._lock:
            self._subacks[mid] = list(reason_codes)
            self._lock.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        self.messages.put(Received(message.topic, bytes(message.payload), bool(message.retain)))

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> int:
        """Publish at QoS 1 and return the PUBACK reason code."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, f"publish {topic}: rc {info.rc}"
        with self._lock:
            if not self._lock.wait_for(lambda: info.mid in self._pubacks, WAIT):
                raise AssertionError(f"no PUBACK for {topic} within {WAIT}s")
            return self._pubacks.pop(info.mid).value

    def publish_many(self, topic: str, payloads: list[bytes]) -> list[int]:
        """Publish all at QoS 1 without waiting in between; return the PUBACK codes."""
        mids = [self.client.publish(topic, payload, qos=1).mid for payload in payloads]
        with self._lock:
            if not self._lock.wait_for(lambda: all(m in self._pubacks for m in mids), WAIT):
                raise AssertionError(f"missing PUBACKs on {topic} after {WAIT}s")
            return [self._pubacks.pop(m).value for m in mids]

    def subscribe(self, topic: str) -> int:
        """Subscribe at QoS 1 and return the SUBACK reason code."""
        rc, mid = self.client.subscribe(topic, qos=1)
        assert rc == mqtt.MQTT_ERR_SUCCESS, f"subscribe {topic}: rc {rc}"
        assert mid is not None
        with self._lock:
            if not self._lock.wait_for(lambda: mid in self._subacks, WAIT):
                raise AssertionError(f"no SUBACK for {topic} within {WAIT}s")
            (code,) = self._subacks.pop(mid)
            return code.value

    def receive_until(self, topic: str) -> list[Received]:
        """Everything received up to and including the first message on `topic`."""
        got: list[Received] = []
        while True:
            try:
                message = self.messages.get(timeout=WAIT)
            except queue.Empty:
                raise AssertionError(
                    f"nothing on {topic} within {WAIT}s; got {len(got)} messages, last {got[-3:]}"
                ) from None
            got.append(message)
            if message.topic == topic:
                return got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    """Collects the test's clients and closes them even when the test fails."""
    opened: list[Peer] = []
    yield opened
    for peer in opened:
        peer.close()


def connect(
    peers: list[Peer],
    broker: MosquittoBroker,
    username: str | None,
    *,
    clean_start: bool = True,
    session_expiry: int | None = None,
) -> Peer:
    peer = Peer(broker, username, clean_start=clean_start, session_expiry=session_expiry)
    peers.append(peer)
    return peer


def device_name() -> str:
    # Unique per test: a persistent session left behind must not leak into another test.
    return f"dev-{uuid.uuid4().hex[:8]}"


def test_template_packet_limit_matches_constant() -> None:
    template = (CONFIG_DIR / "local.conf.template").read_text()
    (value,) = re.findall(r"^max_packet_size (\d+)$", template, flags=re.MULTILINE)
    assert int(value) == BROKER_MAX_PACKET_SIZE


def test_client_without_username_is_refused(broker: MosquittoBroker, peers: list[Peer]) -> None:
    anonymous = connect(peers, broker, None)

    assert anonymous.connack is not None
    assert anonymous.connack.value == NOT_AUTHORIZED


def test_retained_model_reaches_late_subscriber(
    broker: MosquittoBroker, prefix: str, peers: list[Peer]
) -> None:
    aggregator = connect(peers, broker, "aggregator")
    assert aggregator.publish(f"{prefix}/model/global", b"model-v1", retain=True) in ACCEPTED

    device = connect(peers, broker, device_name())
    assert device.subscribe(f"{prefix}/model/global") == GRANTED_QOS1

    (message,) = device.receive_until(f"{prefix}/model/global")
    assert message == Received(f"{prefix}/model/global", b"model-v1", retain=True)


def test_device_writes_only_its_own_update_topic(
    broker: MosquittoBroker, prefix: str, peers: list[Peer]
) -> None:
    aggregator = connect(peers, broker, "aggregator")
    assert aggregator.subscribe(f"{prefix}/update/+") == GRANTED_QOS1
    dev1 = connect(peers, broker, "dev1")

    forged = dev1.publish(f"{prefix}/update/dev2", b"forged")
    own = dev1.publish(f"{prefix}/update/dev1", b"genuine")

    assert forged == NOT_AUTHORIZED
    assert own in ACCEPTED
    # Same publisher, in order: had the forged update been routed, it would come first.
    got = aggregator.receive_until(f"{prefix}/update/dev1")
    assert got == [Received(f"{prefix}/update/dev1", b"genuine", retain=False)]


def test_device_cannot_publish_global_model(
    broker: MosquittoBroker, prefix: str, peers: list[Peer]
) -> None:
    aggregator = connect(peers, broker, "aggregator")
    assert aggregator.publish(f"{prefix}/model/global", b"model-v1", retain=True) in ACCEPTED
    dev1 = connect(peers, broker, "dev1")

    assert dev1.publish(f"{prefix}/model/global", b"poisoned", retain=True) == NOT_AUTHORIZED
    assert dev1.publish(f"{prefix}/round/current", b"poisoned", retain=True) == NOT_AUTHORIZED

    late = connect(peers, broker, device_name())
    assert late.subscribe(f"{prefix}/model/global") == GRANTED_QOS1
    (message,) = late.receive_until(f"{prefix}/model/global")
    assert message.payload == b"model-v1"


def test_device_cannot_read_other_devices_updates(
    broker: MosquittoBroker, prefix: str, peers: list[Peer]
) -> None:
    # Mosquitto 2.0 grants the subscription and filters each message on delivery.
    snoop = connect(peers, broker, "dev2")
    assert snoop.subscribe(f"{prefix}/#") == GRANTED_QOS1
    dev1 = connect(peers, broker, "dev1")
    aggregator = connect(peers, broker, "aggregator")

    assert dev1.publish(f"{prefix}/update/dev1", b"private") in ACCEPTED
    assert dev1.publish(f"{prefix}/status/dev1", b"private") in ACCEPTED
    assert aggregator.publish(f"{prefix}/round/current", b"round-1") in ACCEPTED

    got = snoop.receive_until(f"{prefix}/round/current")
    assert [m.topic for m in got] == [f"{prefix}/round/current"]


def test_persistent_session_gets_messages_sent_while_away(
    broker: MosquittoBroker, prefix: str, peers: list[Peer]
) -> None:
    name = device_name()
    device = connect(peers, broker, name, clean_start=False, session_expiry=300)
    assert device.subscribe(f"{prefix}/model/global") == GRANTED_QOS1
    device.close()
    aggregator = connect(peers, broker, "aggregator")
    sent = [f"chunk-{i}".encode() for i in range(5)]
    for payload in sent:
        assert aggregator.publish(f"{prefix}/model/global", payload) in ACCEPTED

    back = connect(peers, broker, name, clean_start=False, session_expiry=300)
    # The old subscription to round/current does not exist: subscribe now, so the
    # sentinel proves the queue was flushed (queued messages are sent first).
    assert back.session_present
    assert back.subscribe(f"{prefix}/round/current") == GRANTED_QOS1
    assert aggregator.publish(f"{prefix}/round/current", b"after") in ACCEPTED
    got = back.receive_until(f"{prefix}/round/current")

    queued = [m.payload for m in got if m.topic == f"{prefix}/model/global"]
    assert sorted(set(queued)) == sorted(sent)  # QoS 1 may duplicate, never lose


@pytest.mark.slow
def test_offline_queue_holds_more_than_mosquitto_default(
    broker: MosquittoBroker, prefix: str, peers: list[Peer]
) -> None:
    # Mosquitto's default max_queued_messages (1,000) drops the rest silently.
    name = device_name()
    device = connect(peers, broker, name, clean_start=False, session_expiry=300)
    assert device.subscribe(f"{prefix}/model/global") == GRANTED_QOS1
    assert device.subscribe(f"{prefix}/round/current") == GRANTED_QOS1
    device.close()
    aggregator = connect(peers, broker, "aggregator")
    sent = [f"chunk-{i}".encode() for i in range(1_100)]
    codes = aggregator.publish_many(f"{prefix}/model/global", sent)
    assert set(codes) <= set(ACCEPTED)
    assert aggregator.publish(f"{prefix}/round/current", b"sentinel") in ACCEPTED

    back = connect(peers, broker, name, clean_start=False, session_expiry=300)
    got = back.receive_until(f"{prefix}/round/current")

    queued = {m.payload for m in got if m.topic == f"{prefix}/model/global"}
    assert queued == set(sent)


def test_clean_start_false_without_expiry_keeps_nothing(
    broker: MosquittoBroker, prefix: str, peers: list[Peer]
) -> None:
    # MQTT 5 pitfall (STACK-NOTES): without SessionExpiryInterval the session ends
    # at disconnect, whatever clean_start says.
    name = device_name()
    device = connect(peers, broker, name, clean_start=False)
    assert device.subscribe(f"{prefix}/model/global") == GRANTED_QOS1
    device.close()
    aggregator = connect(peers, broker, "aggregator")
    assert aggregator.publish(f"{prefix}/model/global", b"lost") in ACCEPTED

    back = connect(peers, broker, name, clean_start=False)
    assert not back.session_present
    assert back.subscribe(f"{prefix}/round/current") == GRANTED_QOS1
    assert aggregator.publish(f"{prefix}/round/current", b"sentinel") in ACCEPTED
    got = back.receive_until(f"{prefix}/round/current")
    assert [m.topic for m in got] == [f"{prefix}/round/current"]


def test_sigkill_keeps_retained_model(
    fresh_broker: MosquittoBroker, prefix: str, peers: list[Peer]
) -> None:
    aggregator = connect(peers, fresh_broker, "aggregator")
    assert aggregator.publish(f"{prefix}/model/global", b"model-v7", retain=True) in ACCEPTED
    # One more round trip: Mosquitto saves at the top of its next loop iteration,
    # after the PUBACK for the model went out.
    assert aggregator.publish(f"{prefix}/round/current", b"round-7", retain=True) in ACCEPTED
    aggregator.close()
    port = fresh_broker.port

    fresh_broker.kill()
    assert not fresh_broker.running
    fresh_broker.restart()

    assert fresh_broker.port == port
    device = connect(peers, fresh_broker, device_name())
    assert device.subscribe(f"{prefix}/model/global") == GRANTED_QOS1
    (message,) = device.receive_until(f"{prefix}/model/global")
    assert message == Received(f"{prefix}/model/global", b"model-v7", retain=True)


def test_sigkill_keeps_persistent_session_queue(
    fresh_broker: MosquittoBroker, prefix: str, peers: list[Peer]
) -> None:
    name = device_name()
    device = connect(peers, fresh_broker, name, clean_start=False, session_expiry=300)
    assert device.subscribe(f"{prefix}/round/current") == GRANTED_QOS1
    device.close()
    aggregator = connect(peers, fresh_broker, "aggregator")
    assert aggregator.publish(f"{prefix}/round/current", b"round-3") in ACCEPTED
    assert aggregator.publish(f"{prefix}/model/global", b"extra round trip") in ACCEPTED
    aggregator.close()

    fresh_broker.kill()
    fresh_broker.restart()

    back = connect(peers, fresh_broker, name, clean_start=False, session_expiry=300)
    assert back.session_present
    got = back.receive_until(f"{prefix}/round/current")
    assert [m.payload for m in got] == [b"round-3"]


def test_packet_limit_counts_the_whole_packet(broker: MosquittoBroker, peers: list[Peer]) -> None:
    name = device_name()
    topic = f"fedge/t{uuid.uuid4().hex[:8]}/update/{name}"
    device = connect(peers, broker, name)
    gone = threading.Event()
    device.client.on_disconnect = lambda *args: gone.set()

    # Fixed header, topic, packet id and properties take a few bytes of the limit.
    assert device.publish(topic, b"\0" * (BROKER_MAX_PACKET_SIZE - 1024)) in ACCEPTED
    device.client.publish(topic, b"\0" * BROKER_MAX_PACKET_SIZE, qos=1)

    assert gone.wait(WAIT), "broker accepted a packet over max_packet_size"
