"""Attack: a device grows the broker without bound (issue 17, item 5).

The ACL granted ``pattern write fedge/+/update/%u`` and ``fedge/+/status/%u``: a device could
publish a retained 1 MiB message under every fleet name it invented (150 of them took the
broker from 26 to 171 MB and its database from 10 to 160 MB, and every round slowed 10x with
``autosave_on_changes``). Mosquitto 2.0 cannot forbid the retain flag or bound a retained
message's size per topic (``retain_available``, ``max_packet_size`` and ``message_size_limit``
are global), so: the production ACL is pinned to the CA's fleet (a device owns two topics),
and the aggregator deletes a retained update, and a retained status that is oversize or not a
status, as soon as it sees one. Both measured here by the broker's own database file.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.client import CallbackAPIVersion, Client
from paho.mqtt.enums import MQTTProtocolVersion

from fedge.envelopes import DeviceState, DeviceStatus
from simulation.broker import MosquittoBroker
from simulation.datasets import make_federated
from tests.integration import test_broker_security as secure
from tests.integration.fleet_helpers import Fleet, wait_until
from tests.integration.test_broker_security import clients, fleet  # noqa: F401  (fixtures)

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


def _db_bytes(broker: MosquittoBroker) -> int:
    db = broker.data_dir / "mosquitto.db"
    return db.stat().st_size if db.exists() else 0


def _settled_db_bytes(broker: MosquittoBroker) -> int:
    """The database size once two reads 0.3 s apart agree (it is saved after each change)."""
    last = -1
    for _ in range(30):
        size = _db_bytes(broker)
        if size == last:
            return size
        last = size
        time.sleep(0.3)
    return last


def test_a_device_cannot_park_retained_messages_under_other_fleets(
    fleet: secure.Fleet,  # noqa: F811
    clients: list[secure.Client],  # noqa: F811
) -> None:
    # Prepare
    dev1 = secure.device(clients, fleet, "dev1")
    before = _settled_db_bytes(fleet.broker)
    # Execute: 8 invented fleets x (update, status), 1 MiB retained each
    codes = [
        dev1.publish(f"fedge/x{i}/{kind}/dev1", bytes(MIB), retain=True)
        for i in range(8)
        for kind in ("update", "status")
    ]
    own = dev1.publish(f"fedge/{secure.FLEET}/update/dev1", b"an update")
    after = _settled_db_bytes(fleet.broker)
    # Assert: every one refused, the database did not grow; its own fleet still works
    assert codes == [secure.NOT_AUTHORIZED] * 16
    assert after - before < MIB, (before, after)
    assert own in secure.ACCEPTED


@pytest.fixture
def growth_fleet(fresh_broker: MosquittoBroker, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(fresh_broker, tmp_path, make_federated("digits", 2, "iid", seed=0), rounds=1)
    yield f
    f.close()


def _device(local: Fleet, name: str) -> Any:
    c = Client(CallbackAPIVersion.VERSION2, name, protocol=MQTTProtocolVersion.MQTTv5)
    c.username_pw_set(name)
    c.connect(local.url.host, local.url.port)
    c.loop_start()
    return c


def test_the_aggregator_clears_what_a_device_parks_on_its_own_topics(
    growth_fleet: Fleet, fresh_broker: MosquittoBroker
) -> None:
    # Prepare: the aggregator runs; dev-1 is hostile, dev-2 honest
    local = growth_fleet
    local.start_aggregator()
    agg = local.aggregator
    wait_until(lambda: agg.session.connected, 10, "aggregator connected")
    base = _settled_db_bytes(fresh_broker)
    t = local.topics
    mallory, honest = _device(local, "dev-1"), _device(local, "dev-2")
    online = DeviceStatus("dev-2", DeviceState.ONLINE, None, time.time()).to_bytes()
    try:
        # Execute: 1 MiB retained on its update topic and on its status topic, 3 times
        for _ in range(3):
            for topic in (t.update("dev-1"), t.status("dev-1")):
                mallory.publish(topic, bytes(MIB), qos=1, retain=True).wait_for_publish(5)
        honest.publish(t.status("dev-2"), online, qos=1, retain=True).wait_for_publish(5)
        wait_until(lambda: agg.metrics.events["retained_cleared"] >= 6, 10, "six clears")
        after = _settled_db_bytes(fresh_broker)
    finally:
        for c in (mallory, honest):
            c.disconnect()
            c.loop_stop()
    # Assert: the database is back to its size before the attack; the honest status counts
    assert after - base < MIB // 4, (base, after)
    assert "dev-2" in agg.online
    assert "dev-1" not in agg.known


def test_ca_init_and_broker_config_take_the_fleet(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    data = tmp_path / "data"
    data.mkdir()
    init = secure._fedge("ca", "init", "--dir", str(ca), "--fleet", "plant7")
    acl_init = (ca / "broker" / "acl").read_text()
    again = secure._fedge(
        "ca", "broker-config", "--dir", str(ca), "--data-dir", str(data), "--user", "nobody",
        "--out", str(tmp_path / "m.conf"), "--fleet", "plant8",
        "--acl-template", "broker_config/acl.sharded",
    )  # fmt: skip
    acl_again = (ca / "broker" / "acl").read_text()

    assert init.returncode == 0, init.stderr
    assert "pattern write fedge/plant7/status/%u" in acl_init
    # no grant for any fleet (deny lines keep fedge/+/: they deny under every fleet)
    grants = [ln for ln in acl_init.splitlines() if ln[:1] != "#" and " deny " not in ln]
    assert "fedge/+/" not in "".join(grants)
    assert "pattern write fedge/plant8/update/%u" in acl_again
    assert "topic read fedge/plant8/update/+" in acl_again  # the shard workers' sections
    assert again.returncode == 0 or "not writable by the broker user" in again.stderr
