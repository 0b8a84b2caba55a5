"""Prometheus metrics of a service, on a registry of its own (several services share a process
in tests and in ``fedge simulate``; the global default registry would mix them).

``PrometheusSink`` is a metrics sink (``aggregator.metrics.MetricsSink``): counters and
histograms updated on the loop thread as things happen (prometheus_client's metrics are
thread-safe, so a scrape reads them from the web thread as they are). ``FleetCollector``
yields the gauges (devices by state, model version, the open round, central accuracy and loss)
at scrape time from a ``FleetSnapshot``, never from the live service. No metric has a device
label: a fleet of thousands would make as many series; the dashboard has the per-device view.
The names are listed in docs/operations.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from aggregator.metrics import MetricsSink
from aggregator.observe.fleetview import FleetSnapshot

__all__ = ["DEVICE_STATES", "FleetCollector", "PrometheusSink", "round_outcome"]

DEVICE_STATES = ("online", "offline", "revoked", "unannounced")

_ROUND_SECONDS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
_STALENESS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32)
_WRITE_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
# Failed-round reasons carry numbers ("quorum not met: 1 of 2 by deadline"): the label keeps
# the kind only, so the series stay few.
_FAILURES = {
    "quorum not met": "quorum_not_met",
    "aggregation failed": "aggregation_failed",
    "aggregate is not finite": "not_finite",
}


def round_outcome(record: Mapping[str, Any]) -> str:
    """``published``, or the kind of failure of a failed round's record."""
    if "version" in record:
        return "published"
    reason = str(record.get("failed", ""))
    return next((v for k, v in _FAILURES.items() if reason.startswith(k)), "failed")


class PrometheusSink(MetricsSink):
    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        codec: str | Callable[[], str],
        prefix: str = "fedge",
    ) -> None:
        """``codec``: the codec of the rounds (the ``codec`` label of uplink bytes), or where
        to read it when it is known only later (a shard worker learns it from the task)."""
        self._codec = codec
        p = prefix
        self.rounds = Counter(
            f"{p}_rounds", "Rounds that ended, by outcome", ["outcome"], registry=registry
        )
        self.round_seconds = Histogram(
            f"{p}_round_duration_seconds",
            "Round open to close, published rounds",
            buckets=_ROUND_SECONDS,
            registry=registry,
        )
        self.updates = Counter(
            f"{p}_updates",
            "Update messages taken (result=accepted) or refused (result=rejected, by reason)",
            ["result", "reason"],
            registry=registry,
        )
        self.events = Counter(
            f"{p}_events", "Things counted that refused nothing", ["event"], registry=registry
        )
        self.bytes = Counter(
            f"{p}_bytes",
            "MQTT PUBLISH packet bytes: up = updates received, down = models and tasks published "
            "(once; the broker fans them out)",
            ["direction", "kind", "codec"],
            registry=registry,
        )
        self.staleness = Histogram(
            f"{p}_update_staleness_versions",
            "Versions between an accepted update's base and the version it goes into (async)",
            buckets=_STALENESS,
            registry=registry,
        )
        self.journal = Histogram(
            f"{p}_journal_append_seconds",
            "Append + fsync of one accepted update to the round journal",
            buckets=_WRITE_SECONDS,
            registry=registry,
        )
        self.checkpoint = Histogram(
            f"{p}_checkpoint_write_seconds",
            "Atomic checkpoint write (temp, fsync, rename, fsync dir)",
            buckets=_WRITE_SECONDS,
            registry=registry,
        )
        self._timings = {"journal_append": self.journal, "checkpoint": self.checkpoint}
        # Series that exist from the start read 0 instead of missing, so rate() works at once.
        for outcome in ("published", "quorum_not_met"):
            self.rounds.labels(outcome)
        self.updates.labels("accepted", "")
        if isinstance(codec, str):
            self.bytes.labels("up", "update", codec)
        self.bytes.labels("down", "model", "onnx")
        self.bytes.labels("down", "task", "msgpack")

    def reject(self, reason: str, count: int = 1, *, device: str | None = None) -> None:
        self.updates.labels("rejected", reason).inc(count)

    def event(self, name: str) -> None:
        self.events.labels(name).inc()

    def accept(
        self,
        count: int = 1,
        *,
        device: str | None = None,
        staleness: int = 0,
        base_version: int | None = None,
    ) -> None:
        self.updates.labels("accepted", "").inc(count)
        for _ in range(count):
            self.staleness.observe(staleness)

    def received(self, device: str, packet_bytes: int) -> None:
        codec = self._codec if isinstance(self._codec, str) else self._codec()
        self.bytes.labels("up", "update", codec).inc(packet_bytes)

    def timing(self, name: str, seconds: float) -> None:
        h = self._timings.get(name)
        if h is not None:
            h.observe(seconds)

    def write(self, record: Mapping[str, Any]) -> None:
        outcome = round_outcome(record)
        self.rounds.labels(outcome).inc()
        if outcome == "published":
            self.round_seconds.observe(float(record.get("seconds", 0.0)))
            self.bytes.labels("down", "model", "onnx").inc(int(record.get("model_bytes", 0)))
        self.bytes.labels("down", "task", "msgpack").inc(int(record.get("task_bytes", 0)))


class FleetCollector(Collector):
    """Gauges read from the latest snapshot at each scrape (``snapshot``: from the web thread;
    None when the service has not answered yet, and then no gauge is yielded)."""

    def __init__(self, snapshot: Callable[[], FleetSnapshot | None], prefix: str = "fedge") -> None:
        self._snapshot = snapshot
        self._p = prefix

    def describe(self) -> list[Metric]:
        return []  # no describe-time scrape: registering must not wait for the service

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        if s is None:
            return
        p = self._p
        devices = GaugeMetricFamily(f"{p}_devices", "Devices by state", labels=["state"])
        for state in DEVICE_STATES:
            devices.add_metric([state], s.count(state))
        known = len(s.devices) - s.count("unannounced")
        devices.add_metric(["known"], known)
        yield devices
        yield GaugeMetricFamily(f"{p}_model_version", "Latest published version", s.version)
        last = s.last_published
        if last is not None and last.accuracy is not None:
            yield GaugeMetricFamily(
                f"{p}_central_accuracy", "Central accuracy of the latest version", last.accuracy
            )
        if last is not None and last.loss is not None:
            yield GaugeMetricFamily(
                f"{p}_central_loss", "Central loss of the latest version", last.loss
            )
        r = s.open_round
        yield GaugeMetricFamily(f"{p}_round_open", "1 while a round is open", int(r is not None))
        if r is not None:
            yield GaugeMetricFamily(f"{p}_round_id", "Id of the open round", r.round)
            yield GaugeMetricFamily(
                f"{p}_round_counted_updates", "Updates counted in the open round", r.counted
            )
            yield GaugeMetricFamily(
                f"{p}_round_target_updates", "Counted updates that close the open round", r.target
            )
            yield GaugeMetricFamily(
                f"{p}_round_deadline_timestamp_seconds",
                "Deadline of the open round (Unix time)",
                r.deadline,
            )
