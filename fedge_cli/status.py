"""``fedge status --broker URL --fleet F``: the devices and the open round, in a terminal.

Read-only: it connects as ``monitor`` (the broker's ACL lets that identity read the status,
model and round topics; never as ``aggregator``, whose client id would take the real
aggregator's session over), with a clean session that leaves nothing queued at the broker,
reads the retained statuses and task for ``--wait`` seconds, prints, and disconnects.
"""

from __future__ import annotations

import argparse
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedge.envelopes import DeviceState, DeviceStatus, RoundTask

__all__ = ["Seen", "add_arguments", "read_fleet", "render", "run"]


@dataclass
class Seen:
    """What the retained topics of a fleet said."""

    statuses: dict[str, DeviceStatus] = field(default_factory=dict)
    task: RoundTask | None = None
    bad: int = 0  # messages that did not parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    # `fedge ca init` makes `monitor` (CA/monitor/password); `fedge ca fleet G` makes
    # `monitor.G` (CA/fleets/G/monitor/password) for a fleet added to the broker.
    p.add_argument("--broker", required=True, help="mqtt://HOST:PORT or mqtts://HOST:PORT")
    p.add_argument("--fleet", required=True, help="the fleet name (topic prefix fedge/<fleet>)")
    p.add_argument("--username", default="monitor", help="read-only identity (default: monitor)")
    p.add_argument("--password-file", type=Path, default=None, help="file holding its password")
    p.add_argument("--ca-cert", default=None, help="mqtts://: the fleet CA (CA/ca.crt)")
    p.add_argument(
        "--wait", type=float, default=1.5, help="seconds to collect retained messages (1.5)"
    )


def read_fleet(
    url: str,
    fleet: str,
    *,
    username: str = "monitor",
    password: str | None = None,
    ca_cert: str | None = None,
    wait: float = 1.5,
) -> Seen:
    """Connect, subscribe to the fleet's statuses and task, collect for ``wait`` seconds."""
    from paho.mqtt.client import CallbackAPIVersion, Client
    from paho.mqtt.enums import MQTTProtocolVersion

    from fedge.errors import BrokerUnavailable, ProtocolError
    from fedge.topics import Topics
    from fedge.transport.mqtt import BrokerURL, probe_broker

    if username == "aggregator" or username.startswith("aggregator."):
        raise ValueError(
            "fedge status never connects as aggregator: it would take the aggregator's "
            "session over; use the read-only monitor identity"
        )
    broker = BrokerURL.parse(url)
    topics = Topics(fleet)
    probe_broker(broker, ca_cert=ca_cert)
    seen = Seen()
    connected = threading.Event()
    refused: list[str] = []
    lock = threading.Lock()

    def on_connect(_c: Client, _u: object, _f: object, rc: object, _p: object = None) -> None:
        if getattr(rc, "is_failure", False):
            refused.append(str(rc))
        connected.set()

    def on_message(_c: Client, _u: object, msg: object) -> None:
        topic, payload = msg.topic, msg.payload  # type: ignore[attr-defined]
        if not payload:
            return  # a cleared retained message
        with lock:
            try:
                if topic == topics.task:
                    seen.task = RoundTask.from_bytes(payload)
                else:
                    device = topics.device_of(topic, "status")
                    if device is not None:
                        seen.statuses[device] = DeviceStatus.from_bytes(payload)
            except ProtocolError:
                seen.bad += 1

    client = Client(
        CallbackAPIVersion.VERSION2, client_id=username, protocol=MQTTProtocolVersion.MQTTv5
    )
    client.username_pw_set(username, password)
    if broker.tls:
        client.tls_set(ca_certs=ca_cert)
    client.on_connect = on_connect
    client.on_message = on_message
    # Clean start, no session expiry: the broker keeps nothing for us after we leave.
    client.connect(broker.host, broker.port, keepalive=30, clean_start=True)
    client.loop_start()
    try:
        if not connected.wait(10):
            raise BrokerUnavailable(f"no CONNACK from {broker} within 10 s: is it MQTT there?")
        if refused:
            raise BrokerUnavailable(f"{broker} refused {username!r}: {refused[0]}")
        client.subscribe([(topics.all_statuses, 1), (topics.task, 1)])
        time.sleep(wait)
    finally:
        client.disconnect()
        client.loop_stop()
    with lock:
        return Seen(dict(seen.statuses), seen.task, seen.bad)


def _ago(ts: float, now: float) -> str:
    if not ts:
        return "-"
    s = max(0.0, now - ts)
    if s < 60:
        return f"{s:.0f} s ago"
    if s < 3600:
        return f"{s / 60:.0f} min ago"
    if s < 86400:
        return f"{s / 3600:.1f} h ago"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def render(fleet: str, seen: Seen, now: float | None = None) -> str:
    """The table: one line for the open round, one per device, a count line."""
    now = time.time() if now is None else now
    lines = []
    task = seen.task
    if task is not None:
        left = task.deadline - now
        due = f"deadline in {left:.0f} s" if left > 0 else f"deadline passed {-left:.0f} s ago"
        asks = "all devices" if task.selected is None else f"{len(task.selected)} devices"
        lines.append(
            f"fleet {fleet}: round {task.round} open on v{task.base_version}, {due}, "
            f"codec {task.codec}, asks {asks}"
        )
    else:
        lines.append(f"fleet {fleet}: no round task published")
    statuses = seen.statuses
    rows = [("DEVICE", "STATE", "MODEL", "LAST SEEN", "ASKED")]
    for device in sorted(statuses):
        st = statuses[device]
        asked = "-" if task is None else ("yes" if task.asks(device) else "no")
        model = f"v{st.version}" if st.version is not None else "-"
        rows.append((device, str(st.state), model, _ago(st.ts, now), asked))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    online = sum(s.state != DeviceState.OFFLINE for s in statuses.values())
    tail = f"{len(statuses)} devices: {online} online, {len(statuses) - online} offline"
    if seen.bad:
        tail += f"; {seen.bad} unreadable messages ignored"
    lines.append(tail)
    if task is None and not statuses and not seen.bad:
        # The broker grants every subscription and filters on delivery: a fleet name this
        # identity may not read looks exactly like an empty fleet.
        lines.append(
            f"nothing retained under fedge/{fleet}/: no aggregator nor device of this fleet "
            "connected yet, or this identity may not read it (the fleet name? a fleet added "
            "with `fedge ca fleet G` is read as --username monitor.G)"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    password = None
    if args.password_file is not None:
        try:
            password = args.password_file.read_text().strip()
        except OSError as e:
            raise ValueError(f"cannot read --password-file {args.password_file}: {e}") from None
    seen = read_fleet(
        args.broker,
        args.fleet,
        username=args.username,
        password=password,
        ca_cert=args.ca_cert,
        wait=args.wait,
    )
    print(render(args.fleet, seen))
