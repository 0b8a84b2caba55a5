"""What a role needs from its broker connection, and how it is handed one.

A role (the aggregator service, a shard worker, the reducer, an edge agent) publishes,
starts, closes, and sometimes defers an ack: that is :class:`RoleSession`. It does not choose
the broker URL, credentials or TLS: those belong to the deployment. So a role receives a
:data:`SessionFactory` and calls it with what only the role knows (:class:`SessionRequest`:
client id, subscriptions, callbacks, manual ack, will). The default factory
(``fedge.transport.session.MqttSessions``) builds today's real MQTT 5 ``Session``; unit tests
pass ``fedge.transport.memory.MemoryBroker.session`` instead and need no broker. ``Loop`` is
the part of ``Mux`` the roles use for their own work (hand-overs and timers), so a test can
drive them on a virtual clock.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "Cancellable",
    "Loop",
    "MessageHandler",
    "PublishDone",
    "RoleSession",
    "SessionFactory",
    "SessionRequest",
]

PublishDone = Callable[[bool, str], None]
MessageHandler = Callable[[str, bytes], None]


class RoleSession(Protocol):
    """One broker connection as a role uses it; every method runs on the role's loop."""

    connected: bool

    def start(self) -> None:
        """Connect (and reconnect until closed); ``on_connected`` follows each connection."""

    def close(self, last: tuple[str, bytes] | None = None) -> None:
        """Publish ``last`` (retained) if connected, then disconnect cleanly."""

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        on_done: PublishDone | None = None,
    ) -> int:
        """Queue a publish and return its packet size; ``on_done(ok, reason)`` follows."""
        ...

    def defer_ack(self) -> Callable[[], None]:
        """From inside a handler (manual ack): leave the message unacked, return its ack."""
        ...

    def subscribe(self, filters: Sequence[str]) -> None:
        """Add latest-only subscriptions now (retained copies follow) and after reconnects."""

    def unsubscribe(self, filters: Sequence[str]) -> None:
        """Drop subscriptions now and from every later (re)connect."""

    @property
    def current_retained(self) -> bool:
        """From inside a handler: the message carries the retain flag (on a ``watch_retained``
        subscription, the publisher asked the broker to retain it)."""
        ...


@dataclass(frozen=True)
class SessionRequest:
    """The role's side of a session: what the deployment cannot decide for it."""

    client_id: str
    subscriptions: Sequence[str]
    on_message: MessageHandler
    on_connected: Callable[[], None] | None = None
    # True: a QoS 1 message is acked only once the handler returned (after a durable record).
    manual_ack: bool = False
    will: tuple[str, bytes] | None = None
    keepalive: int = 30
    session_expiry: int = 24 * 3600
    # Subscriptions taken with Retain As Published and No Local (MQTT 5): the handler sees
    # ``current_retained`` as the publisher set it, and never its own clearing publishes.
    watch_retained: tuple[str, ...] = ()
    # Filters (also in ``subscriptions``) of retained topics where only the newest message
    # matters: subscribed at QoS 0, so the broker queues nothing for them while the session
    # is away; the retained copy arrives after every (re)subscribe (docs/protocol.md §2.1).
    latest_only: Sequence[str] = ()
    # One process of this role per identity (the aggregator): a session repeatedly closed
    # within seconds of connecting, never having held a connection, gives up (another process
    # holds the client id). Off for devices, whose flaky links look the same.
    detect_takeover: bool = False


SessionFactory = Callable[[SessionRequest], RoleSession]


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class Loop(Protocol):
    """The calls a role makes on its event loop (``Mux``, or a test's virtual clock)."""

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None: ...

    def call_later(self, delay: float, fn: Callable[[], Any]) -> Cancellable: ...
