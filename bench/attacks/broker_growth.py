"""Broker memory and database under issue 17's retained-growth attack (item 5).

One device publishes 150 retained 1 MiB messages on ``fedge/x<i>/update/dev1`` and
``fedge/x<i>/status/dev1`` (75 invented fleets) to a local Mosquitto, once with the shipped
any-fleet ACL (``fedge/+/``) and once with it pinned to one fleet
(``fedge_cli.pki.acl.render_acl``), and prints the broker's RSS and database size::

    PYTHONPATH=. .venv/bin/python bench/attacks/broker_growth.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from paho.mqtt.client import CallbackAPIVersion, Client  # noqa: E402
from paho.mqtt.enums import MQTTProtocolVersion  # noqa: E402

from fedge_cli.pki.acl import render_acl  # noqa: E402
from simulation.broker import CONFIG_DIR, MosquittoBroker  # noqa: E402

FLEETS = 75
MIB = 1 << 20


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(pinned: bool) -> str:
    root = Path(tempfile.mkdtemp(prefix="fedge-growth-"))
    acl = root / "acl.src"
    text = (CONFIG_DIR / "acl").read_text()
    acl.write_text(render_acl(text, "prod") if pinned else text)
    with MosquittoBroker(root / "broker", acl=acl) as broker:
        assert broker.pid is not None
        c = Client(CallbackAPIVersion.VERSION2, "dev1", protocol=MQTTProtocolVersion.MQTTv5)
        c.username_pw_set("dev1")
        c.connect(broker.host, broker.port)
        c.loop_start()
        before, t0 = rss_mib(broker.pid), time.monotonic()
        for i in range(FLEETS):
            for kind in ("update", "status"):
                topic = f"fedge/x{i}/{kind}/dev1"
                c.publish(topic, bytes(MIB), qos=1, retain=True).wait_for_publish(30)
        seconds = time.monotonic() - t0
        time.sleep(2)
        db = broker.data_dir / "mosquitto.db"
        db_mib = db.stat().st_size / MIB if db.exists() else 0.0
        after = rss_mib(broker.pid)
        c.disconnect()
        c.loop_stop()
    acl_name = "pinned" if pinned else "any-fleet"
    return (
        f"{acl_name}: broker RSS {before:.0f} -> {after:.0f} MiB, database {db_mib:.1f} MiB, "
        f"{seconds:.1f} s for {2 * FLEETS} publishes"
    )


if __name__ == "__main__":
    for pinned in (False, True):
        print(run(pinned), flush=True)
