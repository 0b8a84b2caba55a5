"""Models larger than one MQTT packet: split on the aggregator, assembled on the device.

The aggregator publishes chunk ``i`` of version ``v`` retained on ``{p}/model/chunk/{i}``,
then the manifest (a ``GlobalModel`` with ``chunks`` > 0 and no ``onnx``) on
``{p}/model/global``. Messages on different topics may arrive in any order, so the
``Assembler`` keeps chunks of the newest version it has heard of and completes when it holds
the manifest and every chunk. Memory is bounded by the manifest's ``size`` (itself bounded by
``Limits.max_model_bytes``); the result is checked against the manifest's sha256.

``ModelReceiver`` sits in front of the assembler for whoever follows the model topics (the
device, a shard worker): payload in, complete model out, with the version floor and the
signature check of protocol §9.4.
"""

from __future__ import annotations

import hashlib

from fedge.envelopes import GlobalModel, ModelChunk
from fedge.errors import ProtocolError
from fedge.identity import VerifyKey
from fedge.limits import DEFAULT_LIMITS, Limits
from fedge.topics import Topics

__all__ = ["Assembler", "ModelReceiver", "split_model"]


def split_model(version: int, onnx: bytes, sha256: str, chunk_bytes: int) -> list[ModelChunk]:
    count = max(1, -(-len(onnx) // chunk_bytes))
    return [
        ModelChunk(version, i, count, sha256, onnx[i * chunk_bytes : (i + 1) * chunk_bytes])
        for i in range(count)
    ]


class Assembler:
    """Collects the chunks of the newest announced version."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.manifest: GlobalModel | None = None
        self._version = -1
        self._chunks: dict[int, bytes] = {}
        self._bytes = 0

    def offer_manifest(self, m: GlobalModel) -> GlobalModel | None:
        if m.version < self._version:
            return None
        if m.version > self._version:
            self._reset(m.version)
        self.manifest = m
        # Chunks that arrived before the manifest were not yet bounded by its size.
        if self._bytes > m.size or any(i >= m.chunks for i in self._chunks):
            self._reset(m.version)
            self.manifest = m
        return self._complete()

    def offer_chunk(self, c: ModelChunk) -> GlobalModel | None:
        if c.version < self._version:
            return None
        if c.version > self._version:
            self._reset(c.version)
        m = self.manifest
        if m is not None and (c.count != m.chunks or c.sha256 != m.sha256):
            raise ProtocolError(
                "bad_chunk", f"chunk {c.index} of v{c.version} disagrees with manifest"
            )
        if c.index not in self._chunks:
            limit = m.size if m is not None else self.max_bytes
            if self._bytes + len(c.data) > limit:
                raise ProtocolError("too_large", f"chunks of v{c.version} exceed size {limit}")
            self._chunks[c.index] = c.data
            self._bytes += len(c.data)
        return self._complete()

    def _reset(self, version: int) -> None:
        self._version = version
        self._chunks = {}
        self._bytes = 0
        self.manifest = None

    def _complete(self) -> GlobalModel | None:
        m = self.manifest
        if m is None or len(self._chunks) < m.chunks:
            return None
        data = b"".join(self._chunks[i] for i in range(m.chunks))
        self._chunks, self._bytes = {}, 0
        if len(data) != m.size or hashlib.sha256(data).hexdigest() != m.sha256:
            raise ProtocolError("bad_hash", f"assembled model v{m.version} does not match manifest")
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
        self._assembler = Assembler(limits.max_model_bytes)

    def wants(self, topic: str) -> bool:
        """Whether ``topic`` is one of the model topics this receiver assembles from."""
        return topic == self.topics.model or self._is_chunk(topic)

    def hold(self, version: int, sha256: str) -> None:
        """The caller now holds this model: nothing older is returned from now on."""
        self.held = (version, sha256)

    def offer(self, topic: str, payload: bytes) -> GlobalModel | None:
        if topic == self.topics.model:
            m = GlobalModel.from_bytes(payload, self.limits)
            full = self._assembler.offer_manifest(m) if m.is_manifest else m
        elif payload and self._is_chunk(topic):
            full = self._assembler.offer_chunk(ModelChunk.from_bytes(payload, self.limits))
        else:
            return None
        return None if full is None else self._admit(full)

    def _is_chunk(self, topic: str) -> bool:
        return self.topics.device_of(topic, "model/chunk") is not None

    def _admit(self, m: GlobalModel) -> GlobalModel | None:
        if self.held is not None:
            version, sha256 = self.held
            if m.version < version:
                raise ProtocolError(
                    "stale_model", f"refused model v{m.version} older than held v{version}"
                )
            if m.version == version and m.sha256 == sha256:
                return None  # a re-publish of what we hold (reconnect, retained)
        key = self.verify_key
        if key is not None and not (m.signature and key.verify(m.digest(), m.signature)):
            raise ProtocolError(
                "bad_signature", f"refused model v{m.version}: missing or bad signature"
            )
        return m
