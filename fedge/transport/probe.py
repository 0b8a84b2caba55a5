"""Is it an MQTT broker, and does it speak TLS? One exchange at start, one line when not.

A session pointed at the wrong port hangs: paho reconnects forever to a TLS listener it
talks plain MQTT to, or to a port that accepts TCP and never answers. Before a role starts its
session, ``probe_mqtt`` opens one connection (TLS when the URL says ``mqtts://``), sends an MQTT 5
CONNECT with a throw-away client id and no credentials, and reads the first bytes back within
``timeout`` seconds:

- a CONNACK (any reason code: a broker refusing anonymous clients is still a broker) is a
  broker; the probe disconnects at once;
- a TLS record (alert or handshake) to plain MQTT: the port speaks TLS, use ``mqtts://``;
- a TLS handshake failing with ``wrong version number``: the port does not speak TLS, use
  ``mqtt://``; a certificate failure names the CA file;
- the connection closed without an answer, no answer at all, or bytes that are not MQTT:
  said as such, with the URL.

The throw-away client id (``fedge-probe-<random>``) never takes a session over.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import time

from fedge.errors import BrokerUnavailable
from fedge.support.config_io import tls_context
from fedge.transport.mqtt import BrokerURL

__all__ = ["probe_mqtt"]

log = logging.getLogger(__name__)

_CONNACK = 0x20
_TLS_RECORDS = (0x15, 0x16)  # alert, handshake


def _connect_packet(client_id: str) -> bytes:
    """An MQTT 5 CONNECT: clean start, keepalive 10 s, no properties, no credentials."""
    cid = client_id.encode()
    variable = b"\x00\x04MQTT\x05\x02\x00\x0a\x00"
    body = variable + len(cid).to_bytes(2, "big") + cid
    assert len(body) < 128  # one-byte remaining length
    return bytes([0x10, len(body)]) + body


def probe_mqtt(
    url: BrokerURL,
    *,
    timeout: float = 3.0,
    ca_cert: str | None = None,
    client_cert: str | None = None,
    client_key: str | None = None,
    unreachable_ok: bool = False,
) -> None:
    """Return if an MQTT broker answers at ``url``; else ``BrokerUnavailable`` with one line
    that says what is there instead (module docstring). Unusable TLS files: ``InvalidValue``
    naming the file (``fedge.support.config_io.tls_context``).

    ``unreachable_ok``: nothing accepting connections at ``url`` (refused, unreachable, no TCP
    answer) is only logged, for a service whose broker may come up later (a device booting
    before the network, a broker restarting): its session retries with back-off. Something
    that answers, but wrongly, is a mistake in the config and still raises."""
    ctx = tls_context(ca_cert, client_cert, client_key) if url.tls else None
    deadline = time.monotonic() + timeout
    try:
        raw = socket.create_connection((url.host, url.port), timeout=timeout)
    except OSError as e:
        why = f"cannot reach the broker at {url}: {e.strerror or e}"
        if unreachable_ok:
            log.warning("%s; retrying in the background", why)
            return
        raise BrokerUnavailable(f"{why}; is Mosquitto running there?") from None
    with raw:
        sock: socket.socket = raw
        if ctx is not None:
            try:
                sock = ctx.wrap_socket(raw, server_hostname=url.host)
            except ssl.SSLCertVerificationError as e:
                against = (
                    f"tls.ca_cert {ca_cert}"
                    if ca_cert
                    else "the system CAs (no tls.ca_cert given; fedge status: --ca-cert)"
                )
                raise BrokerUnavailable(
                    f"{url}: the broker's certificate does not verify against {against}: "
                    f"{e.verify_message}"
                ) from None
            except ssl.SSLError as e:
                hint = " (not a TLS port? use mqtt://)" if "WRONG_VERSION" in str(e) else ""
                raise BrokerUnavailable(f"{url}: TLS handshake failed: {e.reason}{hint}") from None
            except TimeoutError:
                raise BrokerUnavailable(
                    f"{url}: no TLS handshake within {timeout:g} s: is that port a TLS listener?"
                ) from None
            except OSError as e:
                raise BrokerUnavailable(
                    f"{url}: TLS handshake failed: the connection was closed "
                    f"({e.strerror or e}); not a TLS port? use mqtt://"
                ) from None
        try:
            first = _exchange(sock, url, deadline, timeout)
        finally:
            sock.close()
    if first[0] == _CONNACK:
        return
    if first[0] in _TLS_RECORDS and not url.tls:
        raise BrokerUnavailable(f"{url} answers with TLS, not plain MQTT: use mqtts://")
    raise BrokerUnavailable(f"{url} answered, but not as an MQTT broker (got {first[:16]!r})")


def _exchange(sock: socket.socket, url: BrokerURL, deadline: float, timeout: float) -> bytes:
    """Send the CONNECT, return the first bytes of the answer (DISCONNECT sent after a
    CONNACK)."""
    hint = (
        " (a mutual-TLS listener? give tls.client_cert and tls.client_key)"
        if url.tls
        else " (a TLS listener? use mqtts://)"
    )
    try:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        sock.sendall(_connect_packet(f"fedge-probe-{os.urandom(6).hex()}"))
        first = sock.recv(64)
    except TimeoutError:
        raise BrokerUnavailable(
            f"no MQTT answer from {url} within {timeout:g} s: is that port an MQTT broker?{hint}"
        ) from None
    except ssl.SSLError as e:
        # A mutual-TLS listener ends the session after the handshake when no certificate
        # came (TLS 1.3): with an alert, or an EOF, whichever the client reads first.
        if "CERTIFICATE_REQUIRED" in str(e):
            raise BrokerUnavailable(
                f"{url}: the broker requires a client certificate (a mutual-TLS listener): "
                "give tls.client_cert and tls.client_key"
            ) from None
        raise BrokerUnavailable(
            f"{url} closed the connection without an MQTT answer{hint}"
        ) from None
    except OSError as e:
        first = b""
        if not isinstance(e, ConnectionResetError):
            raise BrokerUnavailable(f"{url}: {e.strerror or e}{hint}") from None
    if not first:
        raise BrokerUnavailable(f"{url} closed the connection without an MQTT answer{hint}")
    if first[0] == _CONNACK:
        with contextlib.suppress(OSError):  # it refused us and closed: still a broker
            sock.sendall(b"\xe0\x00")  # DISCONNECT, normal
    return first
