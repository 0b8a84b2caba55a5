"""Check, with raw paho clients, how a local Mosquitto treats MQTT 5 shared subscriptions.

Question for sharded aggregation (issue 7): does Mosquitto distribute
``$share/aggregators/fedge/<fleet>/update/+`` across 2-4 aggregator workers, and does
``broker_config/acl`` let the workers subscribe?

For each case a fresh ``MosquittoBroker`` (simulation/broker.py, broker_config/ config) is
started; K workers subscribe (MQTT 5, QoS 1) with the shared filter; 20 devices publish 15
updates each (QoS 1) on their own ``update/<device>`` topic; we count what each worker got.

    .venv/bin/python bench/scale/shared_sub_check.py [--out runs/bench/shared_sub]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from simulation.broker import CONFIG_DIR, MosquittoBroker  # noqa: E402

FLEET = "fedge/sharecheck"
DEVICES, PER_DEVICE = 20, 15


def client(username: str) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=username, protocol=mqtt.MQTTv5)
    c.username_pw_set(username)
    return c


def run_case(workdir: Path, acl: Path, usernames: list[str]) -> dict[str, object]:
    got: Counter[str] = Counter()
    seen: set[tuple[str, bytes]] = set()
    dup = 0
    suback: dict[str, list[int]] = {}
    disconnects: Counter[str] = Counter()
    lock = threading.Lock()
    with MosquittoBroker(workdir, acl=acl) as broker:
        workers = []
        for i, user in enumerate(usernames):
            name = f"w{i}:{user}"
            c = client(user)

            def on_message(_c, _u, msg, name=name) -> None:  # type: ignore[no-untyped-def]
                nonlocal dup
                with lock:
                    got[name] += 1
                    key = (msg.topic, msg.payload)
                    dup += key in seen
                    seen.add(key)

            def on_subscribe(_c, _u, _mid, codes, _p, name=name) -> None:  # type: ignore[no-untyped-def]
                suback[name] = [int(rc.value) for rc in codes]

            def on_disconnect(_c, _u, _f, _rc, _p, name=name) -> None:  # type: ignore[no-untyped-def]
                disconnects[name] += 1

            c.on_message, c.on_subscribe, c.on_disconnect = on_message, on_subscribe, on_disconnect
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 0
            c.connect(broker.host, broker.port, keepalive=30, clean_start=True, properties=props)
            c.loop_start()
            c.subscribe(f"$share/aggregators/{FLEET}/update/+", qos=1)
            workers.append(c)
        time.sleep(1.0)
        pubs = []
        for d in range(DEVICES):
            p = client(f"dev-{d:02d}")
            p.connect(broker.host, broker.port, keepalive=30)
            p.loop_start()
            pubs.append(p)
        time.sleep(0.5)
        infos = [
            p.publish(f"{FLEET}/update/dev-{d:02d}", f"{d}:{k}".encode(), qos=1)
            for k in range(PER_DEVICE)
            for d, p in enumerate(pubs)
        ]
        for info in infos:
            info.wait_for_publish(10)
        deadline = time.monotonic() + 5
        while sum(got.values()) < DEVICES * PER_DEVICE and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        for c in workers + pubs:
            c.disconnect()
            c.loop_stop()
    return {
        "workers": usernames,
        "suback_reason_codes": suback,
        "received_per_worker": dict(got),
        "received_total": sum(got.values()),
        "sent": DEVICES * PER_DEVICE,
        "duplicates": dup,
        "worker_disconnects": dict(disconnects),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        # The shipped ACL: one "aggregator" user. With use_username_as_clientid, workers
        # sharing that username share one client id and kick each other out.
        shipped = CONFIG_DIR / "acl"
        # The same ACL plus one read grant per worker identity (what sharding would need).
        sharded = t / "acl-sharded"
        sharded.write_text(
            shipped.read_text()
            + "\n".join(f"\nuser aggregator-{i}\ntopic read fedge/+/update/+" for i in range(4))
            + "\n"
        )
        cases = [("shipped ACL, 1 worker 'aggregator'", shipped, ["aggregator"])]
        cases += [
            (f"shipped ACL, {k} workers all named 'aggregator'", shipped, ["aggregator"] * k)
            for k in (2,)
        ]
        cases += [
            (f"shipped ACL, {k} workers aggregator-0..{k - 1}", shipped,
             [f"aggregator-{i}" for i in range(k)])
            for k in (2,)
        ]  # fmt: skip
        cases += [
            (f"ACL + per-worker grants, {k} workers", sharded,
             [f"aggregator-{i}" for i in range(k)])
            for k in (2, 3, 4)
        ]  # fmt: skip
        for i, (title, acl, users) in enumerate(cases):
            r = {"case": title, **run_case(t / f"b{i}", acl, users)}
            results.append(r)
            print(json.dumps(r), flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
