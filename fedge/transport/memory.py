"""An in-process broker and a virtual-clock loop, for unit tests of orchestration logic.

``MemoryBroker.session`` is a ``SessionFactory``: a role built with it talks to the other
sessions of the same broker, with no sockets and no threads. Enough of MQTT for the roles'
logic: retained messages (an empty retained payload deletes), ``+``/``#`` filters,
``$share/<group>/...`` subscriptions (one member of the group gets each message), persistent
sessions (messages for a disconnected session wait for it, except on its ``latest_only``
filters, which a real broker does not queue at QoS 0), and QoS-1-ish delivery: a message
whose handler raised, or whose deferred ack never came, is delivered again at the session's
next ``start()``. Deliveries run on the caller's thread from one FIFO queue, so a handler that
publishes never re-enters another handler. Not a conformance model of MQTT: integration
tests run against a real Mosquitto.

``ManualLoop`` is a ``Loop`` whose timers fire only when the test calls ``advance``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fedge.transport.base import PublishDone, SessionRequest
from fedge.transport.mqtt import checked_packet_size
from fedge.transport.mux import Timer  # the same timer record as the real loop's

__all__ = ["ManualLoop", "MemoryBroker", "MemorySession", "topic_matches"]

log = logging.getLogger(__name__)


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching with ``+`` (one level) and ``#`` (the rest); ``$share`` stripped."""
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2]
    want, got = topic_filter.split("/"), topic.split("/")
    for i, w in enumerate(want):
        if w == "#":
            return True
        if i >= len(got) or (w != "+" and w != got[i]):
            return False
    return len(want) == len(got)


@dataclass
class _Message:
    topic: str
    payload: bytes
    acked: bool = False
    retain: bool = False  # as MQTT 5 sets it: sent from the retained store, or as published


class MemorySession:
    """One client of a ``MemoryBroker``; implements ``RoleSession``."""

    def __init__(self, broker: MemoryBroker, request: SessionRequest) -> None:
        self.broker = broker
        self.request = request
        self.client_id = request.client_id
        self.connected = False
        self.connects = 0
        self.closed = False
        self._inbox: deque[_Message] = deque()  # waiting while disconnected
        self._unacked: list[_Message] = []
        self._outbox: list[tuple[str, bytes, bool, PublishDone | None]] = []
        self._current: _Message | None = None
        self._deferred = False

    def start(self) -> None:
        """Connect: ``on_connected``, then what waited for this session and what is retained."""
        self.connected, self.closed = True, False
        self.connects += 1
        redeliver, self._unacked = self._unacked, []
        if self.request.on_connected is not None:
            self.request.on_connected()
        outbox, self._outbox = self._outbox, []
        for topic, payload, retain, on_done in outbox:
            self.broker.publish(topic, payload, retain=retain)
            if on_done is not None:
                on_done(True, "memory")
        for m in redeliver + list(self._inbox):
            self.broker.enqueue(self, m)
        self._inbox.clear()
        self.broker.send_retained(self)  # as a real broker does after every SUBSCRIBE
        self.broker.drain()

    def close(self, last: tuple[str, bytes] | None = None) -> None:
        if last is not None and self.connected:
            self.broker.publish(last[0], last[1], retain=True)
        self.connected, self.closed = False, True

    def drop(self) -> None:
        """The connection is lost (not closed): the broker publishes the will."""
        self.connected = False
        if self.request.will is not None:
            self.broker.publish(*self.request.will, retain=True)

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        on_done: PublishDone | None = None,
    ) -> int:
        size = checked_packet_size(topic, len(payload), qos)
        if not self.connected:
            self._outbox.append((topic, payload, retain, on_done))  # sent after reconnecting
            return size
        self.broker.publish(topic, payload, retain=retain)
        if on_done is not None:
            on_done(True, "memory")
        return size

    @property
    def current_retained(self) -> bool:
        return self._current is not None and self._current.retain

    def defer_ack(self) -> Callable[[], None]:
        msg = self._current
        if msg is None or not self.request.manual_ack:
            raise RuntimeError("defer_ack() outside a message handler, or without manual_ack")
        self._deferred = True

        def ack() -> None:
            msg.acked = True
            if msg in self._unacked:
                self._unacked.remove(msg)

        return ack

    def subscribe(self, filters: Sequence[str]) -> None:
        subs = [
            *self.request.subscriptions,
            *(f for f in filters if f not in self.request.subscriptions),
        ]
        latest = [*self.request.latest_only, *filters]
        self.request = replace(self.request, subscriptions=subs, latest_only=latest)
        if self.connected:
            for topic, payload in self.broker.retained.items():
                if any(topic_matches(f, topic) for f in filters):
                    self.broker.enqueue(self, _Message(topic, payload, retain=True))
            self.broker.drain()

    def unsubscribe(self, filters: Sequence[str]) -> None:
        subs = [f for f in self.request.subscriptions if f not in filters]
        self.request = replace(self.request, subscriptions=subs)

    def deliver(self, m: _Message) -> None:
        if not self.connected:
            latest_only = any(topic_matches(f, m.topic) for f in self.request.latest_only)
            if not self.closed and not latest_only:
                self._inbox.append(m)  # persistent session: it waits (QoS 1 only)
            return
        self._current, self._deferred = m, False
        try:
            self.request.on_message(m.topic, m.payload)
        except Exception:
            log.exception("%s: handler failed on %s; left unacked", self.client_id, m.topic)
            self._unacked.append(m)
            return
        finally:
            self._current = None
        if self._deferred and not m.acked:
            self._unacked.append(m)


@dataclass
class MemoryBroker:
    """Retained store, subscriptions and a FIFO of deliveries; see the module docstring."""

    retained: dict[str, bytes] = field(default_factory=dict)
    sessions: dict[str, MemorySession] = field(default_factory=dict)
    published: list[tuple[str, bytes, bool]] = field(default_factory=list)  # every one, in order
    _queue: deque[tuple[MemorySession, _Message]] = field(default_factory=deque)
    _draining: bool = False
    _turn: itertools.count = field(default_factory=itertools.count)

    def session(self, request: SessionRequest) -> MemorySession:
        """The ``SessionFactory``: a new session, or the persistent one of that client id."""
        old = self.sessions.get(request.client_id)
        if old is not None and not old.connected:
            old.request = request
            return old
        if old is not None:
            old.connected = False  # taken over, as a broker drops the older connection
        s = MemorySession(self, request)
        self.sessions[request.client_id] = s
        return s

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.published.append((topic, payload, retain))
        if retain:
            if payload:
                self.retained[topic] = payload
            else:
                self.retained.pop(topic, None)
        groups: dict[str, list[MemorySession]] = {}
        for s in self.sessions.values():
            for f in s.request.subscriptions:
                if not topic_matches(f, topic):
                    continue
                if f.startswith("$share/"):
                    groups.setdefault(f.split("/", 2)[1], []).append(s)
                else:
                    # Retain As Published on watched filters; a live delivery is not retained
                    # otherwise (MQTT 5 §3.3.1.3).
                    watched = retain and f in s.request.watch_retained
                    self.enqueue(s, _Message(topic, payload, retain=watched))
                break
        for members in groups.values():
            live = [s for s in members if s.connected] or members
            self.enqueue(live[next(self._turn) % len(live)], _Message(topic, payload))
        self.drain()

    def send_retained(self, s: MemorySession) -> None:
        for topic, payload in self.retained.items():
            if any(topic_matches(f, topic) for f in s.request.subscriptions):
                self.enqueue(s, _Message(topic, payload, retain=True))

    def enqueue(self, s: MemorySession, m: _Message) -> None:
        self._queue.append((s, m))

    def drain(self) -> None:
        """Deliver queued messages in order; a publish from a handler only queues."""
        if self._draining:
            return
        self._draining = True
        try:
            while self._queue:
                s, m = self._queue.popleft()
                s.deliver(m)
        finally:
            self._draining = False

    def messages(self, topic_filter: str) -> list[bytes]:
        """Payloads published so far on topics matching ``topic_filter``, in order."""
        return [p for t, p, _ in self.published if topic_matches(topic_filter, t)]


class ManualLoop:
    """A ``Loop`` on a virtual clock: ``run()`` does the hand-overs, ``advance(s)`` moves the
    clock and fires the timers that came due, in order."""

    def __init__(self) -> None:
        self.now = 0.0
        self._calls: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._timers: list[Timer] = []
        self._seq = itertools.count()

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        self._calls.append((fn, args))

    def call_later(self, delay: float, fn: Callable[[], Any]) -> Timer:
        t = Timer(self.now + delay, next(self._seq), fn)
        heapq.heappush(self._timers, t)
        return t

    def run(self) -> None:
        while self._calls:
            fn, args = self._calls.popleft()
            fn(*args)

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        self.run()
        while self._timers and self._timers[0].when <= end:
            t = heapq.heappop(self._timers)
            self.now = max(self.now, t.when)
            if not t.cancelled:
                t.fn()
            self.run()
        self.now = end

    @property
    def timers(self) -> int:
        """Timers not yet fired nor cancelled."""
        return sum(not t.cancelled for t in self._timers)
