"""MQTT basics shared by both roles: broker URLs, client construction, exact packet sizes.

Clients are MQTT 5 with a persistent session: ``clean_start=False`` *plus* a
``SessionExpiryInterval`` (measured: ``clean_start=False`` alone redelivered nothing after a
reconnect; with the expiry property 5/5 queued QoS 1 messages came back).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from paho.mqtt.client import CallbackAPIVersion, Client
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedge.errors import InvalidValue, ProtocolError
from fedge.limits import DEFAULT_LIMITS, MAX_PACKET_SIZE

__all__ = [
    "BrokerURL",
    "checked_packet_size",
    "connect_properties",
    "make_client",
    "probe_broker",
    "publish_packet_size",
]


@dataclass(frozen=True)
class BrokerURL:
    """``mqtt://host:port`` (or ``mqtts://`` for TLS)."""

    host: str
    port: int
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> BrokerURL:
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise InvalidValue(
                f"invalid broker URL {url!r}: expected mqtt://HOST:PORT or mqtts://HOST:PORT"
            )
        tls = parts.scheme == "mqtts"
        try:
            port = parts.port
        except ValueError:
            raise InvalidValue(f"invalid port in broker URL {url!r}") from None
        if port is None:
            port = 8883 if tls else 1883
        if not 1 <= port <= 65535:
            raise InvalidValue(f"invalid port in broker URL {url!r}: use 1-65535")
        return cls(parts.hostname, port, tls)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"


def make_client(
    client_id: str,
    username: str | None = None,
    password: str | None = None,
    *,
    manual_ack: bool = False,
) -> Client:
    """An MQTT 5 paho client with unbounded local queues (the broker bounds them)."""
    client = Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5,
        manual_ack=manual_ack,
    )
    if username is not None:
        client.username_pw_set(username, password)
    # 0 = no limit: paho would otherwise refuse publishes silently under load.
    client.max_queued_messages_set(0)
    client.max_inflight_messages_set(20)
    return client


def connect_properties(session_expiry: int) -> Properties:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = session_expiry
    return props


def _varint_len(n: int) -> int:
    size = 1
    while n >= 128:
        n >>= 7
        size += 1
    return size


def publish_packet_size(topic: str, payload_len: int, qos: int = 1, mqtt5: bool = True) -> int:
    """Exact size of the MQTT PUBLISH packet carrying this payload (no properties)."""
    variable = 2 + len(topic.encode()) + (2 if qos > 0 else 0) + (1 if mqtt5 else 0)
    remaining = variable + payload_len
    return 1 + _varint_len(remaining) + remaining


def checked_packet_size(topic: str, payload_len: int, qos: int = 1) -> int:
    """``publish_packet_size``, or ``ProtocolError("too_large")`` when the packet or payload is
    over the limits: the broker would drop the connection and paho would resend forever, and
    a receiver would refuse it anyway, so every session refuses it before sending."""
    size = publish_packet_size(topic, payload_len, qos)
    if size > MAX_PACKET_SIZE or payload_len > DEFAULT_LIMITS.max_payload_bytes:
        raise ProtocolError(
            "too_large",
            f"{payload_len} byte payload ({size} byte packet) on {topic} exceeds the limit "
            f"{DEFAULT_LIMITS.max_payload_bytes} (packet {MAX_PACKET_SIZE})",
        )
    return size


def probe_broker(
    url: BrokerURL,
    timeout: float = 3.0,
    *,
    ca_cert: str | None = None,
    client_cert: str | None = None,
    client_key: str | None = None,
    unreachable_ok: bool = False,
) -> None:
    """Fail fast with one clear line when no MQTT broker answers at ``url``, or it speaks
    TLS and the URL does not (or the reverse): ``fedge.transport.probe``."""
    from fedge.transport.probe import probe_mqtt

    probe_mqtt(
        url,
        timeout=timeout,
        ca_cert=ca_cert,
        client_cert=client_cert,
        client_key=client_key,
        unreachable_ok=unreachable_ok,
    )
