"""Mosquitto's bridge between a site broker and the central one, as broker_config/ ships it:
the topic map (model, round and release in and retained; partials and statuses out; updates
and receipts local), the ACLs (a device of one site reaches neither another site nor the
centre). The production bridge over TLS, as ``fedge ca site`` writes it:
tests/integration/test_ca_site.py."""

from __future__ import annotations

import time
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from simulation.sites import SiteBrokers

pytestmark = pytest.mark.integration

FLEET = "plant"
P = f"fedge/{FLEET}"
WAIT = 10.0


class _Client:
    """A bare MQTT 5 client that records what it gets and every PUBACK reason code."""

    def __init__(self, port: int, user: str, password: str | None = None, **tls: object) -> None:
        self.got: list[tuple[str, bytes, bool]] = []
        self.acks: dict[int, int] = {}
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=user, protocol=mqtt.MQTTv5)
        self.c.username_pw_set(user, password)
        if tls:
            self.c.tls_set(**tls)  # type: ignore[arg-type]
        self.c.on_message = lambda _c, _u, m: self.got.append((m.topic, m.payload, m.retain))
        self.c.on_publish = self._on_publish
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def _on_publish(self, _c: object, _u: object, mid: int, rc: object, _p: object) -> None:
        self.acks[mid] = int(getattr(rc, "value", 0))

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> int:
        """The PUBACK's reason code (0x87: not authorised)."""
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        end = time.monotonic() + WAIT
        while info.mid not in self.acks:
            assert time.monotonic() < end, f"no PUBACK for {topic}"
            time.sleep(0.01)
        return self.acks[info.mid]

    def subscribe(self, topic: str) -> None:
        self.c.subscribe(topic, 1)
        time.sleep(0.3)

    def wait_for(self, topic: str, payload: bytes | None = None) -> tuple[str, bytes, bool]:
        end = time.monotonic() + WAIT
        while time.monotonic() < end:
            for m in self.got:
                if m[0] == topic and (payload is None or m[1] == payload):
                    return m
            time.sleep(0.02)
        raise AssertionError(f"{topic} {payload!r} never came; got {self.got}")

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SiteBrokers]:
    with SiteBrokers(tmp_path_factory.mktemp("sites"), ["a", "b"], fleet=FLEET) as s:
        yield s


@pytest.fixture
def clients() -> Iterator[list[_Client]]:
    made: list[_Client] = []
    yield made
    for c in made:
        c.close()


def test_the_centre_reaches_every_site_retained_and_only_partials_and_statuses_come_back(
    sites: SiteBrokers, clients: list[_Client]
) -> None:
    centre = _Client(sites.central.port, "aggregator")
    clients.append(centre)
    centre.subscribe(f"{P}/#")
    centre.publish(f"{P}/model/global", b"model-1", retain=True)
    centre.publish(f"{P}/round/current", b"task-1", retain=True)
    time.sleep(0.5)
    # A device that joins a site after the publication gets both, retained.
    dev = _Client(sites.site("a").port, "dev-a1")
    clients.append(dev)
    dev.subscribe(f"{P}/#")
    assert dev.wait_for(f"{P}/model/global", b"model-1")[2] is True
    assert dev.wait_for(f"{P}/round/current", b"task-1")[2] is True

    gw = _Client(sites.site("a").port, "gw-a")
    clients.append(gw)
    assert dev.publish(f"{P}/update/dev-a1", b"update") < 0x80
    assert dev.publish(f"{P}/status/dev-a1", b"online", retain=True) < 0x80
    assert gw.publish(f"{P}/partial/gw-a", b"partial") < 0x80
    assert gw.publish(f"{P}/receipt/dev-a1", b"receipt") < 0x80
    centre.wait_for(f"{P}/partial/gw-a", b"partial")
    centre.wait_for(f"{P}/status/dev-a1", b"online")
    time.sleep(0.5)
    crossed = {t for t, _, _ in centre.got}
    assert f"{P}/update/dev-a1" not in crossed
    assert f"{P}/receipt/dev-a1" not in crossed
    # The receipt stayed at the site, where its device reads it.
    dev.wait_for(f"{P}/receipt/dev-a1", b"receipt")


def test_a_device_of_one_site_reaches_neither_another_site_nor_the_centre(
    sites: SiteBrokers, clients: list[_Client]
) -> None:
    centre = _Client(sites.central.port, "aggregator")
    gw_b = _Client(sites.site("b").port, "gw-b")
    clients.extend([centre, gw_b])
    centre.subscribe(f"{P}/#")
    gw_b.subscribe(f"{P}/update/+")
    dev = _Client(sites.site("a").port, "dev-a2")
    clients.append(dev)
    denied = 0x87
    # The gateway's partial, another site's, the centre's control topics, another device.
    for topic in (
        f"{P}/partial/gw-a",
        f"{P}/partial/gw-b",
        f"{P}/round/current",
        f"{P}/round/close",
        f"{P}/model/global",
        f"{P}/release/stable",
        f"{P}/bridge/site-a",
        f"{P}/status/dev-b1",
        f"{P}/update/dev-b1",
    ):
        assert dev.publish(topic, b"forged") == denied, topic
    # Its own update is allowed at its site, and goes nowhere else.
    assert dev.publish(f"{P}/update/dev-a2", b"mine") < 0x80
    time.sleep(1.0)
    assert not [m for m in centre.got if m[1] in (b"forged", b"mine")]
    assert not gw_b.got
    # At the centre, the bridge identity of site a cannot speak for site b's gateway.
    bridge_a = _Client(sites.central.port, "site-a")
    clients.append(bridge_a)
    assert bridge_a.publish(f"{P}/partial/gw-b", b"forged") == denied
    assert bridge_a.publish(f"{P}/round/current", b"forged") == denied
