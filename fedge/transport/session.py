"""One MQTT connection of a role, driven by a ``Mux``.

It subscribes again after every (re)connect, publishes with a size check and a completion
callback fired from ``on_publish`` (paho's return code alone does not say the broker took the
message), and hands incoming messages to the role as ``(topic, payload)``. Every method runs
on the mux thread.

With ``manual_ack`` the session acknowledges a QoS 1 message only after the role's handler
returned normally: a handler that records the message durably before returning gets
"ack after durable record" for free, and a handler that raises leaves the message unacked, so
the broker delivers it again after the next reconnect.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from paho.mqtt.client import (
    MQTT_ERR_NO_CONN,
    MQTT_ERR_SUCCESS,
    Client,
    DisconnectFlags,
    MQTTMessage,
)
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from fedge.errors import ProtocolError
from fedge.transport.base import Loop, PublishDone, SessionRequest
from fedge.transport.mqtt import (
    BrokerURL,
    checked_packet_size,
    connect_properties,
    make_client,
)
from fedge.transport.mux import Link, Mux

__all__ = ["MqttSessions", "Session", "SessionOptions"]

log = logging.getLogger(__name__)

# CONNACK reason codes that say "not this identity" (MQTT 5): bad user name or password, not
# authorized, banned, bad authentication method. Retrying with the same credentials cannot
# succeed, so after ``SessionOptions.max_refusals`` of them in a row the session gives up.
IDENTITY_REFUSALS = frozenset({0x86, 0x87, 0x8A, 0x8C})
TAKEOVERS_BEFORE_GIVING_UP = 5  # for a SessionRequest with detect_takeover


@dataclass(frozen=True)
class SessionOptions:
    client_id: str
    username: str | None = None
    password: str | None = None
    keepalive: int = 30
    session_expiry: int = 24 * 3600
    will: tuple[str, bytes] | None = None
    manual_ack: bool = False
    ca_cert: str | None = None  # mqtts://: CA to trust (default: the system's)
    client_cert: str | None = None  # mutual TLS: this client's certificate and key
    client_key: str | None = None
    # Subscriptions taken with Retain As Published and No Local (MQTT 5): the role sees in
    # ``Session.current_retained`` whether the publisher asked the broker to retain the
    # message, and never receives its own publishes there (clearing a retained copy).
    watch_retained: tuple[str, ...] = ()
    # Consecutive identity refusals (IDENTITY_REFUSALS) before giving up. With the mux's
    # back-off (0.5, 1, 2, 4 s, jittered) five take about 8 s: a refusal while an operator
    # rewrites the password file and reloads the broker is retried, a wrong password is not.
    max_refusals: int = 5
    # Two clients with one client id kick each other off in a loop (Mosquitto 2.0.11 closes
    # the older socket without a DISCONNECT packet). A session that never held a connection
    # for ``stable_after`` seconds and loses ``max_takeovers`` in a row within that time of
    # connecting is the newcomer: it gives up, and the one that was there keeps the identity.
    # 0: off (a device on a flaky link loses young connections too).
    stable_after: float = 10.0
    max_takeovers: int = 0


class Session:
    """A persistent MQTT 5 session with subscriptions and confirmed publishes."""

    def __init__(
        self,
        mux: Mux,
        url: BrokerURL,
        options: SessionOptions,
        subscriptions: Sequence[str],
        on_message: Callable[[str, bytes], None],
        on_connected: Callable[[], None] | None = None,
        latest_only: Sequence[str] = (),
    ) -> None:
        self.mux = mux
        self.url = url
        self.options = options
        self.subscriptions = tuple(subscriptions)
        self.latest_only = frozenset(latest_only)
        self._on_message = on_message
        self._on_connected = on_connected
        self.client: Client = make_client(
            options.client_id, options.username, options.password, manual_ack=options.manual_ack
        )
        if url.tls:
            self.client.tls_set(
                ca_certs=options.ca_cert, certfile=options.client_cert, keyfile=options.client_key
            )
        if options.will is not None:
            topic, payload = options.will
            self.client.will_set(topic, payload, qos=1, retain=True)
        self.client.on_connect = self._handle_connect
        self.client.on_disconnect = self._handle_disconnect
        self.client.on_message = self._handle_message
        self.client.on_publish = self._handle_publish
        self.connected = False
        self.connects = 0
        self._current: MQTTMessage | None = None  # the message being handled
        self._deferred = False
        self.last_error = ""
        self.refusals = 0  # identity refusals in a row
        self.stable = False  # held one connection for stable_after seconds
        self.takeovers = 0  # connections lost within stable_after of connecting, in a row
        self._connected_at = 0.0
        self.refused: str | None = None  # set once the session gave up
        self._pending: dict[int, PublishDone | None] = {}
        self._link: Link | None = None

    def start(self) -> None:
        """Attach to the mux and connect (safe from any thread)."""
        self.mux.call_soon(self._attach)

    def _attach(self) -> None:
        self._link = self.mux.attach(self.client, self._connect)

    def _connect(self, client: Client) -> None:
        if self.connects == 0:
            client.connect(
                self.url.host,
                self.url.port,
                keepalive=self.options.keepalive,
                clean_start=False,
                properties=connect_properties(self.options.session_expiry),
            )
        else:
            client.reconnect()

    def close(self, last: tuple[str, bytes] | None = None) -> None:
        """Publish ``last`` (retained, QoS 0 so nothing waits), disconnect cleanly (mux thread)."""
        if self._link is None:
            return
        if last is not None and self.connected:
            self.client.publish(last[0], last[1], qos=0, retain=True)
        if self.connected:
            self.client.disconnect()
        self.mux.flush_and_close(self._link)
        self.connected = False

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        on_done: PublishDone | None = None,
    ) -> int:
        """Queue a publish; returns its exact packet size. ``on_done(ok, reason)`` follows."""
        size = checked_packet_size(topic, len(payload), qos)
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (MQTT_ERR_SUCCESS, MQTT_ERR_NO_CONN):
            raise ProtocolError("publish", f"paho refused publish on {topic}: rc={info.rc}")
        if qos == 0:
            if on_done is not None:
                on_done(info.rc == MQTT_ERR_SUCCESS, "qos0")
        else:
            # NO_CONN: paho keeps QoS>0 messages and sends them after reconnecting.
            self._pending[info.mid] = on_done
        return size

    def subscribe(self, filters: Sequence[str]) -> None:
        """Latest-only (QoS 0) subscriptions from now on; the broker sends their retained
        messages again even for a filter already held (mux thread)."""
        self.subscriptions += tuple(f for f in filters if f not in self.subscriptions)
        self.latest_only |= frozenset(filters)
        if self.connected and filters:
            self.client.subscribe([(f, SubscribeOptions(0)) for f in filters])

    def unsubscribe(self, filters: Sequence[str]) -> None:
        """No more messages on ``filters``, now and after reconnects (mux thread)."""
        self.subscriptions = tuple(f for f in self.subscriptions if f not in filters)
        if self.connected and filters:
            self.client.unsubscribe(list(filters))

    # -- paho callbacks (mux thread) ------------------------------------------------------------
    def _handle_connect(
        self, client: Client, _u: Any, _flags: Any, rc: ReasonCode, _props: Any
    ) -> None:
        if rc.is_failure:
            self.last_error = f"broker refused connection: {rc}"
            if rc.value in IDENTITY_REFUSALS:
                self._refused(rc)
            else:
                log.warning("%s: %s", self.options.client_id, self.last_error)
            return
        self.refusals = 0
        self.connected = True
        self._connected_at = time.monotonic()
        self.connects += 1
        if self._link is not None:
            self._link.connected_ok()
        if self.subscriptions:
            # Watched topics: Retain As Published and No Local (the role sees who asked for a
            # retained copy, and not its own clearing publishes). QoS 0 for latest-only
            # topics: a QoS 1 subscription of a persistent session makes the broker queue every
            # model, chunk and task published while the device is away and replay them all
            # (9.98 MB after 257 versions, issue 17); the retained copy that follows this
            # SUBSCRIBE is all a device uses.
            watched = self.options.watch_retained
            client.subscribe(
                [
                    (
                        t,
                        SubscribeOptions(
                            0 if t in self.latest_only else 1,
                            noLocal=t in watched,
                            retainAsPublished=t in watched,
                        ),
                    )
                    for t in self.subscriptions
                ]
            )
        if self._on_connected is not None:
            self._on_connected()

    def _refused(self, rc: ReasonCode) -> None:
        self.refusals += 1
        who = self.options.username or self.options.client_id
        if self.refusals < self.options.max_refusals:
            # Once per run of refusals, not once per retry.
            level = logging.WARNING if self.refusals == 1 else logging.DEBUG
            log.log(level, "the broker refused identity %r: %s; retrying with back-off", who, rc)
            return
        self.refused = (
            f"the broker refused identity {who!r} {self.refusals} times in a row: {rc} "
            f"(a wrong password or password_file, a revoked device, or a name the broker "
            f"does not know); giving up"
        )
        if self._link is not None:
            self.mux.give_up(self._link, self.refused)

    def _handle_disconnect(
        self, _c: Client, _u: Any, flags: DisconnectFlags, rc: ReasonCode, _p: Any
    ) -> None:
        if self.connected:
            log.info("%s: disconnected (%s)", self.options.client_id, rc)
            self._count_takeover(flags)
        self.connected = False
        self.connects = max(self.connects, 1)

    def _count_takeover(self, flags: DisconnectFlags) -> None:
        if time.monotonic() - self._connected_at >= self.options.stable_after:
            self.stable = True
            self.takeovers = 0
            return
        if flags.is_disconnect_packet_from_server:
            return  # the broker said why: not a silent takeover
        self.takeovers += 1
        limit = self.options.max_takeovers
        if not limit or self.stable or self.takeovers < limit or self._link is None:
            return
        who = self.options.username or self.options.client_id
        self.refused = (
            f"the connection as {who!r} (client id {self.options.client_id!r}) was closed "
            f"{self.takeovers} times in a row within seconds of connecting: another client "
            f"holds this identity (a second process of this role, e.g. another aggregator of "
            f"this fleet or of another fleet with the same username); giving up so that it "
            f"keeps it"
        )
        self.mux.give_up(self._link, self.refused)

    @property
    def current_retained(self) -> bool:
        """From inside a message handler: the message has its retain flag set (on a
        ``watch_retained`` subscription: the publisher asked the broker to retain it)."""
        return self._current is not None and bool(self._current.retain)

    def defer_ack(self) -> Callable[[], None]:
        """From inside a message handler (``manual_ack``): leave this message unacked when the
        handler returns, and get the function that acks it later. Until then the broker keeps
        it (and redelivers it after a reconnect, when the late ack does nothing)."""
        msg = self._current
        if msg is None or not self.options.manual_ack:
            raise RuntimeError("defer_ack() outside a message handler, or without manual_ack")
        self._deferred = True
        client, generation, mid, qos = self.client, self.connects, msg.mid, msg.qos

        def ack() -> None:
            if qos > 0 and self.connected and self.connects == generation:
                client.ack(mid, qos)

        return ack

    def _handle_message(self, client: Client, _u: Any, msg: MQTTMessage) -> None:
        self._current, self._deferred = msg, False
        try:
            self._on_message(msg.topic, bytes(msg.payload))
        except Exception:
            log.exception(
                "%s: handler failed on %s; left unacked", self.options.client_id, msg.topic
            )
            return
        finally:
            self._current = None
        if self.options.manual_ack and msg.qos > 0 and not self._deferred:
            client.ack(msg.mid, msg.qos)

    def _handle_publish(self, _c: Client, _u: Any, mid: int, rc: ReasonCode, _p: Any) -> None:
        done = self._pending.pop(mid, None)
        if done is not None:
            done(not rc.is_failure, str(rc))


@dataclass(frozen=True)
class MqttSessions:
    """The default ``SessionFactory``: real MQTT 5 sessions on ``mux`` to the deployment's
    broker, with its credentials and TLS files; the role's request supplies the rest."""

    mux: Loop
    url: BrokerURL
    username: str | None = None
    password: str | None = None
    ca_cert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None

    def __call__(self, request: SessionRequest) -> Session:
        if not isinstance(self.mux, Mux):
            raise TypeError(f"MQTT sessions run on a Mux, not {type(self.mux).__name__}")
        options = SessionOptions(
            request.client_id,
            self.username,
            self.password,
            keepalive=request.keepalive,
            session_expiry=request.session_expiry,
            will=request.will,
            manual_ack=request.manual_ack,
            watch_retained=request.watch_retained,
            max_takeovers=TAKEOVERS_BEFORE_GIVING_UP if request.detect_takeover else 0,
            ca_cert=self.ca_cert,
            client_cert=self.client_cert,
            client_key=self.client_key,
        )
        return Session(
            self.mux,
            self.url,
            options,
            subscriptions=request.subscriptions,
            on_message=request.on_message,
            on_connected=request.on_connected,
            latest_only=request.latest_only,
        )
