"""One selector loop that drives many paho clients.

paho's ``loop_start()`` runs a thread per client and uses ``select()``, which fails silently on
sockets numbered >= 1024 (measured: breaks past ~338 clients in one process). Here one thread
owns every client: sockets are registered with an epoll selector through paho's
``on_socket_*`` callbacks, ``loop_read``/``loop_write`` run when ready and ``loop_misc`` once a
second for keepalives. All paho calls happen on this thread; other threads hand work over with
``call_soon``. A connection that drops is retried with jittered exponential back-off.

A session whose identity the broker keeps refusing gives up (``give_up``): it is detached and
its reason kept in ``refused``, and ``gave_up`` is set so that a process running one role
(``fedge agent``, ``fedge aggregator``) can exit with that reason instead of retrying forever.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import random
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from paho.mqtt.client import Client

__all__ = ["Link", "Mux", "Timer"]

log = logging.getLogger(__name__)

_MISC_INTERVAL = 1.0
_BACKOFF_MIN = 0.5
_BACKOFF_MAX = 30.0


@dataclass(order=True)
class Timer:
    when: float
    seq: int
    fn: Callable[[], Any] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class Link:
    """A client attached to the mux, with what it needs to reconnect."""

    client: Client
    connect: Callable[[Client], Any]
    backoff: float = _BACKOFF_MIN
    closing: bool = False
    sock: socket.socket | None = None
    retry: Timer | None = None

    def connected_ok(self) -> None:
        self.backoff = _BACKOFF_MIN


class Mux:
    """An event loop for paho clients, timers and cross-thread calls."""

    def __init__(self, name: str = "fedge-mux") -> None:
        self.name = name
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._calls: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._timers: list[Timer] = []
        self._seq = itertools.count()
        self._links: dict[int, Link] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._rng = random.Random()
        self.refused: str | None = None  # why the first session that gave up did
        self.gave_up = threading.Event()

    # -- threading ----------------------------------------------------------------------------
    def start(self) -> Mux:
        self._thread = threading.Thread(target=self.run, name=self.name, daemon=True)
        self._thread.start()
        self.call_later(_MISC_INTERVAL, self._misc)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wakeup()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def in_loop(self) -> bool:
        return threading.current_thread() is self._thread

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the mux thread (safe from any thread)."""
        self._calls.append((fn, args))
        self._wakeup()

    def call_later(self, delay: float, fn: Callable[[], Any]) -> Timer:
        """Run ``fn`` after ``delay`` seconds; call from the mux thread (or before start)."""
        t = Timer(time.monotonic() + delay, next(self._seq), fn)
        heapq.heappush(self._timers, t)
        return t

    def _wakeup(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    # -- clients --------------------------------------------------------------------------------
    def attach(self, client: Client, connect: Callable[[Client], Any]) -> Link:
        """Own ``client``: ``connect(client)`` is called now and after every drop (mux thread)."""
        link = Link(client, connect)
        self._links[id(client)] = link
        client.on_socket_open = lambda c, _u, s: self._on_open(link, s)
        client.on_socket_close = lambda c, _u, s: self._on_close(link, s)
        client.on_socket_register_write = lambda c, _u, s: self._want_write(link, s, True)
        client.on_socket_unregister_write = lambda c, _u, s: self._want_write(link, s, False)
        self._try_connect(link)
        return link

    def detach(self, link: Link) -> None:
        """Stop reconnecting; the caller has sent DISCONNECT (or lets the socket die)."""
        link.closing = True
        if link.retry is not None:
            link.retry.cancel()
        self._links.pop(id(link.client), None)

    def give_up(self, link: Link, why: str) -> None:
        """Stop reconnecting ``link`` for good, record ``why`` (mux thread, may be called from
        a paho callback: the socket is closed on the next turn of the loop)."""
        self.detach(link)
        self.call_soon(self.flush_and_close, link)
        if self.refused is None:
            self.refused = why
        self.gave_up.set()

    def flush_and_close(self, link: Link) -> None:
        """Write what is queued, then close the socket (mux thread)."""
        self.detach(link)
        with contextlib.suppress(Exception):
            link.client.loop_write()
        if link.sock is not None:
            self._unregister(link.sock)
            with contextlib.suppress(OSError):
                link.sock.close()
            link.sock = None

    def _try_connect(self, link: Link) -> None:
        link.retry = None
        if link.closing or self._stop.is_set():
            return
        try:
            link.connect(link.client)
        except (OSError, ValueError) as e:
            # Warn once per outage, not on every retry.
            level = logging.WARNING if link.backoff == _BACKOFF_MIN else logging.DEBUG
            log.log(level, "cannot reach the broker (%s); retrying with back-off", e)
            self._schedule_reconnect(link)

    def _schedule_reconnect(self, link: Link) -> None:
        if link.closing or link.retry is not None:
            return
        delay = link.backoff * (0.5 + self._rng.random())
        link.backoff = min(link.backoff * 2, _BACKOFF_MAX)
        link.retry = self.call_later(delay, lambda: self._try_connect(link))

    def _on_open(self, link: Link, sock: Any) -> None:
        link.sock = sock
        self._sel.register(sock, selectors.EVENT_READ, link)

    def _on_close(self, link: Link, sock: Any) -> None:
        self._unregister(sock)
        link.sock = None
        self._schedule_reconnect(link)

    def _unregister(self, sock: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(sock)

    def _want_write(self, link: Link, sock: Any, on: bool) -> None:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if on else 0)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.modify(sock, events, link)

    def _misc(self) -> None:
        for link in list(self._links.values()):
            if link.sock is not None:
                link.client.loop_misc()
        self.call_later(_MISC_INTERVAL, self._misc)

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> None:
        if self._thread is None:
            self._thread = threading.current_thread()
        while not self._stop.is_set():
            timeout = _MISC_INTERVAL
            if self._timers:
                timeout = max(0.0, min(timeout, self._timers[0].when - time.monotonic()))
            if self._calls:
                timeout = 0.0
            for key, mask in self._sel.select(timeout):
                if key.data is None:
                    with contextlib.suppress(BlockingIOError, OSError):
                        self._wake_r.recv(4096)
                    continue
                self._service(key.data, mask)
            self._run_calls()
            self._run_timers()
        for link in list(self._links.values()):
            self.flush_and_close(link)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def _service(self, link: Link, mask: int) -> None:
        try:
            if mask & selectors.EVENT_READ:
                link.client.loop_read()
            if mask & selectors.EVENT_WRITE and link.sock is not None:
                link.client.loop_write()
        except Exception:
            log.exception("%s: error in MQTT I/O", self.name)

    def _run_calls(self) -> None:
        for _ in range(len(self._calls)):
            fn, args = self._calls.popleft()
            try:
                fn(*args)
            except Exception:
                log.exception("%s: error in %r", self.name, fn)

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0].when <= now:
            t = heapq.heappop(self._timers)
            if t.cancelled:
                continue
            try:
                t.fn()
            except Exception:
                log.exception("%s: error in timer %r", self.name, t.fn)
