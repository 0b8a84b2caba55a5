"""A TCP proxy on 127.0.0.1 that delays traffic and breaks connections, for clients of a broker.

``tc netem`` needs root and would disturb every user of the shared loopback, so clients that
should see a bad network connect here instead of to the broker:

- latency: every chunk read is forwarded ``delay`` (+ up to ``jitter``) seconds later, in order;
- loss: TCP does not lose bytes quietly, a link does. A reset (RST, both sides) discards what
  the proxy holds in flight, which is what a dropped link does to MQTT; each connection is
  reset after a random lifetime drawn from ``reset_after``, at most ``max_resets`` in all and
  not two within ``min_interval`` seconds;
- partition: ``block()`` resets every connection and refuses new ones until ``unblock()``.

It runs an asyncio loop on a thread of its own; ``start()`` returns once it listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

__all__ = ["ChaosProxy", "ProxyStats"]

_CHUNK = 65536


@dataclass
class ProxyStats:
    connections: int = 0
    refused: int = 0  # connections refused while blocked
    resets: int = 0  # connections reset by the chaos schedule
    cut: int = 0  # connections reset by block()
    bytes_forwarded: int = 0
    bytes_dropped: int = 0  # read from one side, discarded by a reset before delivery
    reset_times: list[float] = field(default_factory=list)


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.writers = (client, upstream)
        self.pending = 0  # bytes read and not yet written
        self.tasks: list[asyncio.Task[None]] = []
        self.closed = False

    def abort(self) -> None:
        self.closed = True
        for w in self.writers:
            sock = w.get_extra_info("socket")
            if sock is not None:
                # SO_LINGER 0: close() sends RST, as a dropped link looks to the peer.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort()


class ChaosProxy:
    def __init__(
        self,
        upstream_port: int,
        *,
        delay: float = 0.0,
        jitter: float = 0.0,
        reset_after: tuple[float, float] | None = None,
        max_resets: int = 0,
        min_interval: float = 0.0,
        flush_on_close: bool = True,
        seed: int = 0,
    ) -> None:
        self.upstream_port = upstream_port
        self.delay, self.jitter = delay, jitter
        self.reset_after = reset_after
        self.max_resets = max_resets
        self.min_interval = min_interval  # between two chaos resets, fleet-wide
        self._last_reset = 0.0
        # A side that closes cleanly gets what it sent delivered first (False: dropped, as
        # when the host dies or the kernel answers with a reset).
        self.flush_on_close = flush_on_close
        self.stats = ProxyStats()
        self.port = 0
        self._rng = random.Random(seed)
        self._blocked = False
        self._links: set[_Link] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="proxy", daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    # -- control (any thread) -----------------------------------------------------------------
    def start(self) -> ChaosProxy:
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def block(self) -> None:
        """Partition: reset every connection and refuse new ones."""

        async def go() -> None:
            self._blocked = True
            for link in list(self._links):
                self.stats.cut += 1
                self._reset(link)

        self._call(go())

    def unblock(self) -> None:
        async def go() -> None:
            self._blocked = False

        self._call(go())

    def stop(self) -> None:
        async def go() -> None:
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()
            for link in list(self._links):
                link.abort()
            tasks = [t for link in self._links for t in link.tasks]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._links.clear()

        if self._thread.is_alive():
            self._call(go())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    def _call(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    # -- the loop -----------------------------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._blocked:
            self.stats.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        self.stats.connections += 1
        link = _Link(writer, up_writer)
        self._links.add(link)
        link.tasks = [
            asyncio.ensure_future(self._pump(link, reader, up_writer)),
            asyncio.ensure_future(self._pump(link, up_reader, writer)),
        ]
        if self.reset_after is not None:
            link.tasks.append(asyncio.ensure_future(self._reset_later(link)))
        await asyncio.gather(*link.tasks, return_exceptions=True)
        self._links.discard(link)

    async def _pump(
        self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        sender = asyncio.ensure_future(self._send(link, queue, writer))
        due = 0.0
        try:
            while data := await reader.read(_CHUNK):
                # In order: a chunk is never due before the one read ahead of it.
                due = max(due, time.monotonic() + self.delay + self._rng.random() * self.jitter)
                link.pending += len(data)
                queue.put_nowait((due, data))
            if self.flush_on_close:
                await queue.join()
        except (ConnectionError, OSError):
            pass  # a reset: what was in flight is gone, as on a real link
        finally:
            if not link.closed:
                self.stats.bytes_dropped += max(link.pending, 0)
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            link.abort()  # one side ended: end the other, as the broker would see it
            me = asyncio.current_task()
            for t in link.tasks:
                if t is not me:
                    t.cancel()

    async def _send(
        self, link: _Link, queue: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter
    ) -> None:
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
            link.pending -= len(data)
            self.stats.bytes_forwarded += len(data)
            queue.task_done()

    async def _reset_later(self, link: _Link) -> None:
        assert self.reset_after is not None
        while not link.closed and self.stats.resets < self.max_resets:
            await asyncio.sleep(self._rng.uniform(*self.reset_after))
            if time.monotonic() - self._last_reset < self.min_interval:
                continue  # spread the resets out: draw another lifetime
            if self.stats.resets < self.max_resets and not link.closed:
                self._last_reset = time.monotonic()
                self.stats.resets += 1
                self.stats.reset_times.append(time.time())
                self._reset(link)

    def _reset(self, link: _Link) -> None:
        if link.closed:
            return
        self.stats.bytes_dropped += max(link.pending, 0)
        link.abort()
        for t in link.tasks:
            t.cancel()
