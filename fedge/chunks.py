"""Models larger than one MQTT packet: split on the aggregator, assembled on the device.

The aggregator publishes chunk ``i`` of version ``v`` retained on ``{p}/model/chunk/{i}``,
then the manifest (a ``GlobalModel`` with ``chunks`` > 0 and no ``onnx``) on
``{p}/model/global``. Messages on different topics may arrive in any order, so the
``Assembler`` keeps chunks of the newest version it has heard of and completes when it holds
the manifest and every chunk. Memory is bounded by the manifest's ``size`` (itself bounded by
``Limits.max_model_bytes``); the result is checked against the manifest's sha256.
"""

from __future__ import annotations

import hashlib

from fedge.envelopes import GlobalModel, ModelChunk
from fedge.errors import ProtocolError

__all__ = ["Assembler", "split_model"]


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
