"""Building blocks for integration tests: real clients against the suite's Mosquitto."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from paho.mqtt.client import CallbackAPIVersion, Client
from paho.mqtt.enums import MQTTProtocolVersion

from fedge.envelopes import RoundTask

__all__ = ["RawDevice", "wait_until"]


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class RawDevice:
    """A hand-driven device: a plain paho client that reads the task and sends any bytes."""

    def __init__(self, host: str, port: int, device_id: str, fleet_prefix: str) -> None:
        self.device_id = device_id
        self.prefix = fleet_prefix
        self.task: RoundTask | None = None
        self._acked: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        self.client = Client(
            CallbackAPIVersion.VERSION2,
            client_id=device_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.username_pw_set(device_id)
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.connect(host, port)
        self.client.subscribe(f"{fleet_prefix}/round/current", qos=1)
        self.client.loop_start()

    def _on_message(self, _c: Client, _u: object, msg: object) -> None:
        self.task = RoundTask.from_bytes(msg.payload)  # type: ignore[attr-defined]

    def _on_publish(self, _c: Client, _u: object, mid: int, _rc: object, _p: object) -> None:
        with self._lock:
            self._acked.setdefault(mid, threading.Event()).set()

    def wait_task(self, round_id: int | None = None, timeout: float = 20) -> RoundTask:
        wait_until(
            lambda: self.task is not None and (round_id is None or self.task.round == round_id),
            timeout,
            f"task for {self.device_id}",
        )
        assert self.task is not None
        return self.task

    def send(self, payload: bytes, timeout: float = 5) -> None:
        info = self.client.publish(f"{self.prefix}/update/{self.device_id}", payload, qos=1)
        with self._lock:
            ev = self._acked.setdefault(info.mid, threading.Event())
        assert ev.wait(timeout), "broker did not ack the publish"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []
