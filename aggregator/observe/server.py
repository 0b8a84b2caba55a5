"""The read-only web endpoint of a service: ``/metrics`` (Prometheus), ``/api/fleet`` (the
fleet snapshot as JSON) and ``/`` (the dashboard, one self-contained page).

The standard library's ``ThreadingHTTPServer`` runs on a thread of its own. It never touches
the service: it asks for a snapshot (``Snapshots.get``), which the service builds on its loop
thread at most every ``max_age`` seconds and hands over whole (a frozen ``FleetSnapshot``).
A loop that does not answer within ``timeout`` (busy exporting a version, or stopped) gets
the previous snapshot served, so a scrape never waits long and the loop never waits at all.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from aggregator.observe.fleetview import FleetSnapshot
from fedge.errors import ConfigError
from fedge.transport.base import Loop

__all__ = ["ObserveServer", "Snapshots", "dashboard_html"]

log = logging.getLogger(__name__)


class Snapshots:
    """The latest ``FleetSnapshot``, rebuilt on ``loop`` when a reader finds it older than
    ``max_age`` seconds. ``get`` is for any thread but the loop's."""

    def __init__(
        self,
        loop: Loop,
        build: Callable[[], FleetSnapshot],
        *,
        max_age: float = 0.5,
        timeout: float = 2.0,
    ) -> None:
        self._loop = loop
        self._build = build
        self._max_age = max_age
        self._timeout = timeout
        self._lock = threading.Lock()
        self._latest: FleetSnapshot | None = None
        self._made = 0.0
        self._pending: threading.Event | None = None

    def get(self) -> FleetSnapshot | None:
        with self._lock:
            if self._latest is not None and time.monotonic() - self._made < self._max_age:
                return self._latest
            ev, ask = self._pending, self._pending is None
            if ev is None:  # one request to the loop at a time, whoever asks
                ev = self._pending = threading.Event()
        if ask:
            self._loop.call_soon(self._on_loop, ev)
        if not ev.wait(self._timeout):
            with self._lock:
                if self._pending is ev:
                    self._pending = None  # the loop never ran it (stopped): ask again next time
        with self._lock:
            return self._latest

    def _on_loop(self, ev: threading.Event) -> None:
        try:
            snap = self._build()
        except Exception:
            log.exception("fleet snapshot failed")
            snap = None
        with self._lock:
            if snap is not None:
                self._latest, self._made = snap, time.monotonic()
            if self._pending is ev:
                self._pending = None
        ev.set()


def dashboard_html(snapshot: FleetSnapshot | None) -> bytes:
    """The page, with the snapshot inlined so the first paint needs no request."""
    page = resources.files("aggregator.observe").joinpath("dashboard.html").read_text("utf-8")
    data = json.dumps(snapshot.to_json() if snapshot is not None else None)
    # Inside <script>: no "</script>" can close it early, whatever a device id holds.
    data = data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return page.replace("/*INITIAL*/null", data, 1).encode("utf-8")


class ObserveServer:
    """Serves ``registry`` and, when ``snapshots`` is given, the fleet JSON and dashboard."""

    def __init__(
        self,
        bind: str,
        port: int,
        registry: CollectorRegistry,
        snapshots: Snapshots | None = None,
    ) -> None:
        self.registry = registry
        self.snapshots = snapshots
        handler = _handler(self)
        try:
            self._httpd = ThreadingHTTPServer((bind, port), handler)
        except OSError as e:
            raise ConfigError(
                f"cannot serve metrics on {bind}:{port}: {e.strerror or e}; "
                "pick another metrics_port (0: any free port)"
            ) from None
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = str(self._httpd.server_address[0])
        return f"http://{host}:{self.port}/"

    def start(self) -> ObserveServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="fedge-observe",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(5)
            self._thread = None
        self._httpd.server_close()


def _handler(server: ObserveServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "fedge"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(server.registry))
                return
            snaps = server.snapshots
            if snaps is None or path not in ("/", "/index.html", "/api/fleet"):
                self._send(404, "text/plain; charset=utf-8", b"not found\n")
                return
            snap = snaps.get()
            if path == "/api/fleet":
                if snap is None:
                    self._send(503, "application/json", b'{"error": "service not ready"}\n')
                    return
                body = json.dumps(snap.to_json()).encode("utf-8")
                self._send(200, "application/json", body)
                return
            self._send(200, "text/html; charset=utf-8", dashboard_html(snap))

        def _send(self, code: int, ctype: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.client_address[0], *args)

    return Handler
