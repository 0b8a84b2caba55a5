"""Models larger than one MQTT packet: split on the aggregator, assembled on the device.

The aggregator publishes chunk ``i`` of version ``v`` retained on ``{p}/model/chunk/{i}``,
then the manifest (a ``GlobalModel`` with ``chunks`` > 0 and no ``onnx``) on
``{p}/model/global``. Messages on different topics may arrive in any order, and anyone who can
publish there (on the demo profile anyone; in production a compromised broker) may forge
either, so the ``Assembler`` trusts only the manifest, and only once its signature verifies
(when it holds the aggregator's key): a manifest moves the version it assembles, a chunk never
does (protocol §5.5). Chunks of the verified manifest are bounded by its ``size`` and checked
against its ``count`` and ``sha256``, the whole file against its hash. Chunks that come before
their manifest (the aggregator publishes them first) wait in a small buffer: twice the size of
the last complete model (at least ``MIN_EARLY_BYTES``), or ``FIRST_EARLY_BYTES`` while none
is known, never ``Limits.max_model_bytes``.

``ModelReceiver`` sits in front of the assembler for whoever follows the model topics (the
device, a shard worker): payload in, complete model out, with the version floor and the
signature check of protocol §9.4.
"""

from __future__ import annotations

import hashlib

from fedge.envelopes import GlobalModel, ModelChunk
from fedge.errors import ProtocolError
from fedge.identity import VerifyKey
from fedge.limits import DEFAULT_LIMITS, MAX_PACKET_SIZE, Limits
from fedge.topics import Topics

__all__ = ["FIRST_EARLY_BYTES", "MIN_EARLY_BYTES", "Assembler", "ModelReceiver", "split_model"]

FIRST_EARLY_BYTES = 4 * MAX_PACKET_SIZE
"""Chunks held before a manifest while no model size is known (64 MiB): a device that
subscribed before the aggregator published its first version gets that version chunks first."""
MIN_EARLY_BYTES = 1024 * 1024
"""The smallest bound once a model size is known (2 x a tiny model would be smaller)."""


def split_model(version: int, onnx: bytes, sha256: str, chunk_bytes: int) -> list[ModelChunk]:
    count = max(1, -(-len(onnx) // chunk_bytes))
    return [
        ModelChunk(version, i, count, sha256, onnx[i * chunk_bytes : (i + 1) * chunk_bytes])
        for i in range(count)
    ]


def _signed_by(key: VerifyKey, m: GlobalModel) -> bool:
    return bool(m.signature) and key.verify(m.digest(), m.signature)


class Assembler:
    """Collects the chunks of the newest verified manifest (protocol §5.5).

    With ``verify_key``, a manifest whose signature does not verify raises ``bad_signature``
    and changes nothing. Without it (the demo profile) manifests are taken as they come, but
    chunks still never move the version. ``max_bytes`` bounds any one model; what is held
    before a manifest is bounded by ``early_cap``.
    """

    def __init__(
        self,
        max_bytes: int,
        *,
        verify_key: VerifyKey | None = None,
        first_early: int = FIRST_EARLY_BYTES,
        min_early: int = MIN_EARLY_BYTES,
    ) -> None:
        self.max_bytes = max_bytes
        self.verify_key = verify_key
        self.first_early = first_early
        self.min_early = min_early
        self.manifest: GlobalModel | None = None
        self._chunks: dict[int, bytes] = {}  # chunks of self.manifest
        self._bytes = 0
        self._done = False  # self.manifest was assembled and handed out
        # Chunks of no manifest held yet, by (version, sha256, count), then index.
        self._early: dict[tuple[int, str, int], dict[int, bytes]] = {}
        self._early_bytes = 0
        self._seen_size = 0  # size of the last complete model (assembled, or inline)
        self.evicted = 0  # groups of early chunks dropped to make room for a nearer version

    @property
    def early_cap(self) -> int:
        """Bytes of chunks held before their manifest (module docstring)."""
        if self._seen_size <= 0:
            return min(self.max_bytes, self.first_early)
        return min(self.max_bytes, max(self.min_early, 2 * self._seen_size))

    @property
    def buffered_bytes(self) -> int:
        return self._bytes + self._early_bytes

    def note_model_size(self, size: int) -> None:
        """A model of ``size`` bytes came another way (inline): the early buffer scales to it."""
        self._seen_size = max(0, size)
        self._make_room(0, version=-1)

    def offer_manifest(self, m: GlobalModel) -> GlobalModel | None:
        if self.verify_key is not None and not _signed_by(self.verify_key, m):
            raise ProtocolError(
                "bad_signature", f"refused manifest v{m.version}: missing or bad signature"
            )
        held = self.manifest
        if held is not None:
            if m.version < held.version:
                return None
            if (m.version, m.sha256) == (held.version, held.sha256):
                return None if self._done else self._complete()  # retained re-delivery
        self.manifest, self._chunks, self._bytes, self._done = m, {}, 0, False
        early = self._early.pop((m.version, m.sha256, m.chunks), {})
        for key in [k for k in self._early if k[0] <= m.version]:
            del self._early[key]
        self._early_bytes = sum(len(d) for g in self._early.values() for d in g.values())
        if sum(len(d) for d in early.values()) <= m.size:
            self._chunks = early
            self._bytes = sum(len(d) for d in early.values())
        return self._complete()

    def offer_chunk(self, c: ModelChunk) -> GlobalModel | None:
        m = self.manifest
        if m is not None and c.version == m.version:
            if c.count != m.chunks or c.sha256 != m.sha256:
                raise ProtocolError(
                    "bad_chunk", f"chunk {c.index} of v{c.version} disagrees with its manifest"
                )
            if self._done or c.index in self._chunks:
                return None  # first copy wins; a finished model is not assembled again
            if self._bytes + len(c.data) > m.size:
                raise ProtocolError("too_large", f"chunks of v{c.version} exceed size {m.size}")
            self._chunks[c.index] = c.data
            self._bytes += len(c.data)
            return self._complete()
        if m is not None and c.version < m.version:
            return None  # older than the model being assembled or held: nothing to do
        key = (c.version, c.sha256, c.count)
        if c.index in self._early.get(key, {}):
            return None
        self._make_room(len(c.data), c.version)
        if self._early_bytes + len(c.data) > self.early_cap:
            raise ProtocolError(
                "too_large",
                f"chunk {c.index} of v{c.version} refused: chunks without a verified manifest "
                f"already hold {self._early_bytes} bytes (cap {self.early_cap})",
            )
        self._early.setdefault(key, {})[c.index] = c.data
        self._early_bytes += len(c.data)
        return None

    def _make_room(self, need: int, version: int) -> None:
        """Drop groups of chunks held aside, farthest future first, until ``need`` more bytes
        fit, but none of ``version`` or lower. The next honest version is the nearest one, so
        chunks claiming version 2^31 cannot keep it out."""
        while self._early_bytes + need > self.early_cap and self._early:
            victim = max(self._early, key=lambda k: k[0])
            if victim[0] <= version:
                return
            self._early_bytes -= sum(len(d) for d in self._early.pop(victim).values())
            self.evicted += 1

    def _complete(self) -> GlobalModel | None:
        m = self.manifest
        if m is None or len(self._chunks) < m.chunks:
            return None
        data = b"".join(self._chunks[i] for i in range(m.chunks))
        self._chunks, self._bytes = {}, 0
        if len(data) != m.size or hashlib.sha256(data).hexdigest() != m.sha256:
            raise ProtocolError("bad_hash", f"assembled model v{m.version} does not match manifest")
        self._done = True
        # Only a complete model (hash checked) sizes the buffer: a manifest's claim could not.
        self.note_model_size(len(data))
        return m.with_onnx(data)


class ModelReceiver:
    """What arrives on the model topics, turned into complete, verified models (protocol §9.4).

    Offer it every message on ``topics.model`` and ``topics.all_model_chunks``
    (:meth:`wants` tells which topics those are). :meth:`offer` returns a whole
    `GlobalModel` (with its ONNX) once there is one to act on: an inline model, or a manifest
    and all its chunks, hashed against the manifest; not older than the model held, not that
    very model again, and signed by ``verify_key`` when one is given. It returns None while a
    chunked model is incomplete, for the model already held, and for an empty chunk payload (a
    retained chunk being cleared). It raises `ProtocolError` for a message that breaks the
    wire contract or a model it refuses (``stale_model``: older than the one held;
    ``bad_signature``: missing or wrong signature with a ``verify_key``).

    The floor is the caller's: it moves only when the caller says it now holds a model
    (:meth:`hold`), so a model it could not use (an unparsable ONNX) does not raise it.
    Without ``held`` and without ``hold`` calls, every complete model is returned.
    """

    def __init__(
        self,
        topics: Topics,
        limits: Limits = DEFAULT_LIMITS,
        *,
        verify_key: VerifyKey | None = None,
        held: tuple[int, str] | None = None,
    ) -> None:
        self.topics = topics
        self.limits = limits
        self.verify_key = verify_key
        self.held = held  # (version, sha256) of the model the caller holds
        self._assembler = Assembler(limits.max_model_bytes, verify_key=verify_key)

    def wants(self, topic: str) -> bool:
        """Whether ``topic`` is one of the model topics this receiver assembles from."""
        return topic == self.topics.model or self._is_chunk(topic)

    def hold(self, version: int, sha256: str) -> None:
        """The caller now holds this model: nothing older is returned from now on."""
        self.held = (version, sha256)

    def offer(self, topic: str, payload: bytes) -> GlobalModel | None:
        if topic == self.topics.model:
            m = GlobalModel.from_bytes(payload, self.limits)
            if m.is_manifest:
                self._refuse_stale(m)  # before it can reset the assembler
                if (m.version, m.sha256) == self.held:
                    return None  # the retained manifest of the model we hold
                full = self._assembler.offer_manifest(m)
            else:
                full = m
        elif payload and self._is_chunk(topic):
            full = self._assembler.offer_chunk(ModelChunk.from_bytes(payload, self.limits))
        else:
            return None
        return None if full is None else self._admit(full)

    def _is_chunk(self, topic: str) -> bool:
        return self.topics.device_of(topic, "model/chunk") is not None

    def _refuse_stale(self, m: GlobalModel) -> None:
        if self.held is not None and m.version < self.held[0]:
            raise ProtocolError(
                "stale_model", f"refused model v{m.version} older than held v{self.held[0]}"
            )

    def _admit(self, m: GlobalModel) -> GlobalModel | None:
        self._refuse_stale(m)
        if self.held is not None and (m.version, m.sha256) == self.held:
            return None  # a re-publish of what we hold (reconnect, retained)
        key = self.verify_key
        if key is not None and not _signed_by(key, m):
            raise ProtocolError(
                "bad_signature", f"refused model v{m.version}: missing or bad signature"
            )
        self._assembler.note_model_size(len(m.onnx))
        return m
