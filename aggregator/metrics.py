"""Where the aggregator's numbers go: the ``MetricsSink`` interface and its implementations.

The service, the intake and the shard worker report through ``MetricsSink`` only (a base
class whose hooks do nothing, so a sink overrides only what it records): rejected
messages by reason (and device, when known), events that are not rejections (e.g. a clamped
sample count), accepted updates (with their staleness), the packet bytes of every update
received, how long durable writes took, and one record per round (a version or a failed
round). ``MetricsLog`` is the JSON lines file of docs/operations.md with its counters;
``aggregator.observe.prometheus.PrometheusSink`` and ``aggregator.observe.fleetview.FleetView``
are two more, given to the service next to it (``Aggregator(..., metrics_sinks=[...])``).
Every call comes on the role's loop thread.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["MetricsFanout", "MetricsLog", "MetricsSink", "NullMetrics"]


class MetricsSink:
    """What the service, the intake and the shard worker report. Every hook does nothing
    here: a sink overrides the ones it records, and this class itself is the null sink."""

    def reject(self, reason: str, count: int = 1, *, device: str | None = None) -> None:
        """``count`` messages refused for ``reason`` (a ``ProtocolError`` reason)."""

    def event(self, name: str) -> None:
        """Something worth counting that refused nothing (``clamped_samples``)."""

    def accept(
        self,
        count: int = 1,
        *,
        device: str | None = None,
        staleness: int = 0,
        base_version: int | None = None,
    ) -> None:
        """``count`` updates counted into a round; ``staleness``: versions between the
        ``base_version`` the device trained on and the version they go into."""

    def received(self, device: str, packet_bytes: int) -> None:
        """An update message arrived, accepted or not: its MQTT PUBLISH packet size."""

    def timing(self, name: str, seconds: float) -> None:
        """A durable write took ``seconds`` (``journal_append``, ``checkpoint``)."""

    def write(self, record: Mapping[str, Any]) -> None:
        """The record of a round: a published version, or a failed round."""


class MetricsLog(MetricsSink):
    """Per-round records as JSON lines at ``path``; counters kept in memory."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rejected: Counter[str] = Counter()
        self.events: Counter[str] = Counter()
        self.accepted = 0

    def reject(self, reason: str, count: int = 1, *, device: str | None = None) -> None:
        self.rejected[reason] += count

    def event(self, name: str) -> None:
        self.events[name] += 1

    def accept(
        self,
        count: int = 1,
        *,
        device: str | None = None,
        staleness: int = 0,
        base_version: int | None = None,
    ) -> None:
        self.accepted += count

    def write(self, record: Mapping[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


class NullMetrics(MetricsSink):
    """Counts nothing: a shard worker's default (its numbers travel in its partial sums)."""


class MetricsFanout(MetricsSink):
    """Every report to each of ``sinks``, in order."""

    def __init__(self, sinks: Iterable[MetricsSink]) -> None:
        self.sinks = tuple(sinks)

    def reject(self, reason: str, count: int = 1, *, device: str | None = None) -> None:
        for s in self.sinks:
            s.reject(reason, count, device=device)

    def event(self, name: str) -> None:
        for s in self.sinks:
            s.event(name)

    def accept(
        self,
        count: int = 1,
        *,
        device: str | None = None,
        staleness: int = 0,
        base_version: int | None = None,
    ) -> None:
        for s in self.sinks:
            s.accept(count, device=device, staleness=staleness, base_version=base_version)

    def received(self, device: str, packet_bytes: int) -> None:
        for s in self.sinks:
            s.received(device, packet_bytes)

    def timing(self, name: str, seconds: float) -> None:
        for s in self.sinks:
            s.timing(name, seconds)

    def write(self, record: Mapping[str, Any]) -> None:
        for s in self.sinks:
            s.write(record)
