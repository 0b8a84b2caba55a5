"""One service's live view, wired: a private Prometheus registry, the two sinks that feed it
and the dashboard (``PrometheusSink``, ``FleetView``), the gauges, and the web server."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry

from aggregator.metrics import MetricsSink
from aggregator.observe.fleetview import FleetSnapshot, FleetView
from aggregator.observe.prometheus import FleetCollector, PrometheusSink
from aggregator.observe.server import ObserveServer, Snapshots
from fedge.transport.base import Loop

__all__ = ["LiveView"]


class LiveView:
    def __init__(self, bind: str, port: int, *, codec: str) -> None:
        self.bind, self.port = bind, port
        self.registry = CollectorRegistry()
        self.prometheus = PrometheusSink(self.registry, codec=codec)
        self.view = FleetView()

    @property
    def sinks(self) -> tuple[MetricsSink, ...]:
        return (self.prometheus, self.view)

    def serve(self, loop: Loop, build: Callable[[], FleetSnapshot]) -> ObserveServer:
        """Start serving; ``build`` makes a snapshot and is called on ``loop`` only."""
        snapshots = Snapshots(loop, build)
        self.registry.register(FleetCollector(snapshots.get))
        return ObserveServer(self.bind, self.port, self.registry, snapshots).start()
