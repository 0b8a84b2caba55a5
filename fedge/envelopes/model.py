"""The model on the wire: ``ModelArch``, ``GlobalModel`` (a signed ONNX file, or the manifest of a
chunked one) and ``ModelChunk`` (protocol §5.4, §5.5)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Self

from fedge.envelopes.common import (
    _MAX_ROUND,
    SCHEMA_VERSION,
    SIGNATURE_BYTES,
    Kind,
    _open,
    _opt,
)
from fedge.errors import ProtocolError
from fedge.limits import DEFAULT_LIMITS, Limits
from fedge.wire import Fields, pack


@dataclass(frozen=True)
class ModelArch:
    """Which registered model the weights belong to."""

    name: str
    input_dim: int
    num_classes: int


@dataclass(frozen=True)
class GlobalModel:
    """A published model version: a self-contained ONNX file and its sha256.

    A model too large for one packet travels as a manifest: ``onnx`` empty, ``chunks`` > 0 and
    ``size`` its length; the bytes follow as ``ModelChunk`` messages (see fedge/chunks.py).
    """

    version: int
    arch: ModelArch
    onnx: bytes
    sha256: str
    created: float
    metrics: dict[str, float] = field(default_factory=dict)
    chunks: int = 0
    size: int = -1
    signature: bytes = b""  # Ed25519 by the aggregator over digest()

    def digest(self) -> bytes:
        from fedge.identity import model_digest

        return model_digest(self.version, self.sha256)

    def __post_init__(self) -> None:
        if self.size < 0:
            object.__setattr__(self, "size", len(self.onnx))

    @property
    def is_manifest(self) -> bool:
        return self.chunks > 0

    def with_onnx(self, onnx: bytes) -> GlobalModel:
        """The complete model, once a manifest's chunks are assembled."""
        return GlobalModel(
            self.version,
            self.arch,
            onnx,
            self.sha256,
            self.created,
            self.metrics,
            signature=self.signature,
        )

    def to_bytes(self) -> bytes:
        return pack(
            {
                "v": SCHEMA_VERSION,
                "kind": str(Kind.MODEL),
                "version": self.version,
                "arch": asdict(self.arch),
                "onnx": self.onnx,
                "sha256": self.sha256,
                "created": float(self.created),
                "metrics": dict(self.metrics),
                "chunks": self.chunks,
                "size": self.size,
                "signature": self.signature,
            }
        )

    @classmethod
    def from_bytes(cls, payload: bytes, limits: Limits = DEFAULT_LIMITS) -> Self:
        import hashlib

        f = _open(payload, Kind.MODEL, limits)
        raw_arch = f.map("arch")
        a = Fields(raw_arch, "model.arch", limits)
        arch = ModelArch(
            a.str("name"), a.int("input_dim", 1, 2**24), a.int("num_classes", 1, 2**24)
        )
        a.done()
        model = cls(
            version=f.int("version", 0, _MAX_ROUND),
            arch=arch,
            onnx=f.bytes("onnx", max_len=limits.max_payload_bytes),
            sha256=f.str("sha256"),
            created=f.float("created", 0.0),
            metrics=f.number_map("metrics"),
            chunks=f.int("chunks", 0, 2**20, optional=True) or 0,
            size=_opt(f.int("size", 0, limits.max_model_bytes, optional=True), -1),
            signature=f.bytes("signature", max_len=SIGNATURE_BYTES, optional=True) or b"",
        )
        f.done()
        if model.is_manifest:
            if model.onnx or model.size <= 0 or len(model.sha256) != 64:
                raise ProtocolError(
                    "schema", "a chunked model manifest needs size, sha256, no onnx"
                )
        elif hashlib.sha256(model.onnx).hexdigest() != model.sha256:
            raise ProtocolError("bad_hash", f"model v{model.version}: sha256 does not match")
        elif model.size != len(model.onnx):
            raise ProtocolError("schema", f"model v{model.version}: size != len(onnx)")
        return model


@dataclass(frozen=True)
class ModelChunk:
    """One piece of a chunked model: ``data`` is bytes ``[index*k, ...)`` of the ONNX file."""

    version: int
    index: int
    count: int
    sha256: str
    data: bytes

    def to_bytes(self) -> bytes:
        return pack(
            {
                "v": SCHEMA_VERSION,
                "kind": str(Kind.CHUNK),
                "version": self.version,
                "index": self.index,
                "count": self.count,
                "sha256": self.sha256,
                "data": self.data,
            }
        )

    @classmethod
    def from_bytes(cls, payload: bytes, limits: Limits = DEFAULT_LIMITS) -> Self:
        f = _open(payload, Kind.CHUNK, limits)
        c = cls(
            version=f.int("version", 0, _MAX_ROUND),
            count=f.int("count", 1, 2**20),
            index=f.int("index", 0, 2**20),
            sha256=f.str("sha256"),
            data=f.bytes("data", max_len=limits.max_payload_bytes),
        )
        f.done()
        if c.index >= c.count:
            raise ProtocolError("schema", f"chunk index {c.index} >= count {c.count}")
        return c
