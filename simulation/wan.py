"""A wide-area link on one machine: a TCP relay on a loopback port that counts the bytes
crossing it both ways and can be cut and restored.

It is the network between a site and the centre, not part of fedge: the site broker's bridge
(or, in the flat topology, every device) connects to ``port`` instead of the central broker,
and the relay passes the bytes through unchanged. ``up`` counts bytes towards the centre,
``down`` bytes from it: TCP payload, so every MQTT byte (headers, PUBACKs, keepalives) and no
TCP/IP header. ``cut()`` closes every connection and refuses new ones until ``restore()``,
as a broken uplink does (the bridge sees its socket close and retries). It also counts the
MQTT PUBLISH packets each way (``publish_up``, ``publish_down``) by following the packets'
fixed headers: messages, as opposed to acks and keepalives.

One thread, one ``selectors`` loop for every connection.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from dataclasses import dataclass

__all__ = ["WanLink"]

_HOST = "127.0.0.1"
_CHUNK = 65536


class _Framer:
    """Follows MQTT packet boundaries in one direction of one connection; counts PUBLISHes."""

    def __init__(self) -> None:
        self.skip = 0  # bytes of the current packet's body still to pass
        self.head = bytearray()  # the fixed header read so far (type byte + length varint)
        self.publishes = 0

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self.skip:
                take = min(self.skip, n - i)
                self.skip -= take
                i += take
                continue
            self.head.append(data[i])
            i += 1
            if len(self.head) >= 2 and not self.head[-1] & 0x80:
                length, mult = 0, 1
                for b in self.head[1:]:
                    length += (b & 0x7F) * mult
                    mult *= 128
                if self.head[0] >> 4 == 3:  # PUBLISH
                    self.publishes += 1
                self.skip = length
                self.head.clear()


@dataclass
class _Pipe:
    near: socket.socket  # the site side (accepted)
    far: socket.socket  # the centre side
    up: _Framer
    down: _Framer


class WanLink:
    def __init__(self, target_port: int, *, target_host: str = _HOST) -> None:
        self.target = (target_host, target_port)
        self._listen = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listen.bind((_HOST, 0))
        self._listen.listen(1024)
        self._listen.setblocking(False)
        self.port: int = self._listen.getsockname()[1]
        self.up = 0
        self.down = 0
        self.connections = 0  # accepted over the link's life
        self._framers: list[_Pipe] = []  # every pipe's counters, closed ones included
        self._cut = False
        self._pipes: dict[socket.socket, _Pipe] = {}
        self._lock = threading.Lock()
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listen, selectors.EVENT_READ)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"wan-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"mqtt://{_HOST}:{self.port}"

    @property
    def bytes(self) -> int:
        """Bytes across the link, both directions."""
        return self.up + self.down

    @property
    def publish_up(self) -> int:
        return sum(p.up.publishes for p in self._framers)

    @property
    def publish_down(self) -> int:
        return sum(p.down.publishes for p in self._framers)

    def start(self) -> WanLink:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop = True
        self._wake_w.send(b"x")
        self._thread.join(5)
        for p in list(self._pipes.values()):
            self._drop(p)
        self._sel.close()
        self._listen.close()
        self._wake_r.close()
        self._wake_w.close()

    def cut(self) -> None:
        """Close every connection across the link; refuse new ones until ``restore``."""
        with self._lock:
            self._cut = True
        self._wake_w.send(b"c")

    def restore(self) -> None:
        with self._lock:
            self._cut = False

    # -- the loop ------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop:
            for key, _ in self._sel.select(0.5):
                sock = key.fileobj
                if sock is self._wake_r:
                    self._wake_r.recv(64)
                    if self._cut:
                        for p in list(self._pipes.values()):
                            self._drop(p)
                elif sock is self._listen:
                    self._accept()
                else:
                    assert isinstance(sock, socket.socket)
                    pipe = self._pipes.get(sock)
                    if pipe is not None:
                        self._pump(pipe, sock)

    def _accept(self) -> None:
        try:
            near, _ = self._listen.accept()
        except BlockingIOError:
            return
        with self._lock:
            cut = self._cut
        if cut:
            near.close()
            return
        try:
            far = socket.create_connection(self.target, timeout=2)
        except OSError:
            near.close()
            return
        for s in (near, far):
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pipe = _Pipe(near, far, _Framer(), _Framer())
        self._framers.append(pipe)
        self._pipes[near] = self._pipes[far] = pipe
        self._sel.register(near, selectors.EVENT_READ)
        self._sel.register(far, selectors.EVENT_READ)
        self.connections += 1

    def _pump(self, pipe: _Pipe, sock: socket.socket) -> None:
        other = pipe.far if sock is pipe.near else pipe.near
        try:
            data = sock.recv(_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(pipe)
            return
        if sock is pipe.near:
            self.up += len(data)
            pipe.up.feed(data)
        else:
            self.down += len(data)
            pipe.down.feed(data)
        try:
            other.settimeout(10)  # loopback: a short blocking send keeps the order simple
            other.sendall(data)
            other.setblocking(False)
        except OSError:
            self._drop(pipe)

    def _drop(self, pipe: _Pipe) -> None:
        for s in (pipe.near, pipe.far):
            if self._pipes.pop(s, None) is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._sel.unregister(s)
            s.close()
