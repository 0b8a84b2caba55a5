"""The four messages of wire contract v1, as frozen dataclasses.

Each has ``to_bytes()`` and a validating ``from_bytes(payload, limits)``. On the wire an
envelope is a msgpack map with ``v`` (schema version) and ``kind``; tensors travel inside the
codec blob as ``bin``. ``docs/protocol.md`` is the normative description.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Self

from fedge.errors import ProtocolError
from fedge.limits import DEFAULT_LIMITS, Limits
from fedge.topics import validate_device_id
from fedge.wire import Fields, pack, unpack_map

__all__ = [
    "SCHEMA_VERSION",
    "DeviceState",
    "DeviceStatus",
    "GlobalModel",
    "Kind",
    "ModelArch",
    "ModelUpdate",
    "RoundTask",
    "TrainHyper",
]

SCHEMA_VERSION = 1
NONCE_BYTES = 16
_MAX_ROUND = 2**31


class Kind(StrEnum):
    TASK = "task"
    UPDATE = "update"
    MODEL = "model"
    STATUS = "status"


class DeviceState(StrEnum):
    ONLINE = "online"
    TRAINING = "training"
    OFFLINE = "offline"


def _open(payload: bytes, kind: Kind, limits: Limits) -> Fields:
    obj = unpack_map(payload, limits, what=str(kind))
    f = Fields(obj, str(kind), limits)
    v = f.int("v", 0, 2**16)
    if v != SCHEMA_VERSION:
        raise ProtocolError(
            "version", f"{kind} schema version {v}, this peer speaks {SCHEMA_VERSION}"
        )
    got = f.str("kind")
    if got != kind:
        raise ProtocolError("schema", f"expected kind {kind!r}, got {got!r}")
    return f


def _device(f: Fields, key: str = "device") -> str:
    d = f.str(key)
    try:
        return validate_device_id(d)
    except ValueError as e:
        raise ProtocolError("schema", str(e)) from None


@dataclass(frozen=True)
class TrainHyper:
    """Local training settings a round asks of devices."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    prox_mu: float = 0.0

    def __post_init__(self) -> None:
        if not 1 <= self.epochs <= 1000:
            raise ValueError(f"epochs must be in [1, 1000], got {self.epochs}")
        if not 1 <= self.batch_size <= 65536:
            raise ValueError(f"batch_size must be in [1, 65536], got {self.batch_size}")
        if not 0.0 < self.lr <= 100.0:
            raise ValueError(f"lr must be in (0, 100], got {self.lr}")
        for name in ("momentum", "weight_decay", "prox_mu"):
            if not 0.0 <= getattr(self, name) < 1e6:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def _read(cls, raw: Any, limits: Limits) -> TrainHyper:
        if not isinstance(raw, dict):
            raise ProtocolError("schema", "task.hyper must be a map")
        f = Fields(raw, "task.hyper", limits)
        vals = {
            "epochs": f.int("epochs", 1, 1000),
            "batch_size": f.int("batch_size", 1, 65536),
            "lr": f.float("lr", 0.0, 100.0),
            "momentum": f.float("momentum", 0.0, 1e6),
            "weight_decay": f.float("weight_decay", 0.0, 1e6),
            "prox_mu": f.float("prox_mu", 0.0, 1e6),
        }
        f.done()
        try:
            return cls(**vals)
        except ValueError as e:
            raise ProtocolError("schema", f"task.hyper: {e}") from None


@dataclass(frozen=True)
class ModelArch:
    """Which registered model the weights belong to."""

    name: str
    input_dim: int
    num_classes: int


@dataclass(frozen=True)
class RoundTask:
    """Opens a round: who trains, from which model version, how, and until when."""

    round: int
    base_version: int
    deadline: float
    codec: str
    hyper: TrainHyper
    nonce: bytes
    selected: tuple[str, ...] | None = None
    issued: float = 0.0

    def asks(self, device: str) -> bool:
        return self.selected is None or device in self.selected

    def to_bytes(self) -> bytes:
        return pack(
            {
                "v": SCHEMA_VERSION,
                "kind": str(Kind.TASK),
                "round": self.round,
                "base_version": self.base_version,
                "deadline": float(self.deadline),
                "issued": float(self.issued),
                "codec": self.codec,
                "hyper": asdict(self.hyper),
                "nonce": self.nonce,
                "selected": list(self.selected) if self.selected is not None else None,
            }
        )

    @classmethod
    def from_bytes(cls, payload: bytes, limits: Limits = DEFAULT_LIMITS) -> Self:
        f = _open(payload, Kind.TASK, limits)
        task = cls(
            round=f.int("round", 1, _MAX_ROUND),
            base_version=f.int("base_version", 0, _MAX_ROUND),
            deadline=f.float("deadline", 0.0),
            issued=f.float("issued", 0.0),
            codec=f.str("codec"),
            hyper=TrainHyper._read(f.map("hyper"), limits),
            nonce=f.bytes("nonce", max_len=NONCE_BYTES),
            selected=_opt_tuple(f.str_list("selected", optional=True)),
        )
        f.done()
        return task


def _opt_tuple(v: list[str] | None) -> tuple[str, ...] | None:
    return None if v is None else tuple(v)


@dataclass(frozen=True)
class ModelUpdate:
    """A device's delta for one round, encoded by the round's codec."""

    device: str
    round: int
    base_version: int
    update_id: str
    nonce: bytes
    num_samples: int
    codec: str
    delta: bytes
    metrics: dict[str, float] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return pack(
            {
                "v": SCHEMA_VERSION,
                "kind": str(Kind.UPDATE),
                "device": self.device,
                "round": self.round,
                "base_version": self.base_version,
                "update_id": self.update_id,
                "nonce": self.nonce,
                "num_samples": self.num_samples,
                "codec": self.codec,
                "delta": self.delta,
                "metrics": dict(self.metrics),
            }
        )

    @classmethod
    def from_bytes(cls, payload: bytes, limits: Limits = DEFAULT_LIMITS) -> Self:
        f = _open(payload, Kind.UPDATE, limits)
        upd = cls(
            device=_device(f),
            round=f.int("round", 1, _MAX_ROUND),
            base_version=f.int("base_version", 0, _MAX_ROUND),
            update_id=f.str("update_id"),
            nonce=f.bytes("nonce", max_len=NONCE_BYTES),
            # Not clamped here: the aggregator clamps to its own bound and counts the event.
            num_samples=f.int("num_samples", 1, 2**62),
            codec=f.str("codec"),
            delta=f.bytes("delta", max_len=limits.max_payload_bytes),
            metrics=f.number_map("metrics"),
        )
        f.done()
        return upd


@dataclass(frozen=True)
class GlobalModel:
    """A published model version: a self-contained ONNX file and its sha256."""

    version: int
    arch: ModelArch
    onnx: bytes
    sha256: str
    created: float
    metrics: dict[str, float] = field(default_factory=dict)

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
        )
        f.done()
        if hashlib.sha256(model.onnx).hexdigest() != model.sha256:
            raise ProtocolError("bad_hash", f"model v{model.version}: sha256 does not match")
        return model


@dataclass(frozen=True)
class DeviceStatus:
    """Retained liveness of a device; its last will publishes the offline form."""

    device: str
    state: DeviceState
    version: int | None = None
    ts: float = 0.0

    def to_bytes(self) -> bytes:
        return pack(
            {
                "v": SCHEMA_VERSION,
                "kind": str(Kind.STATUS),
                "device": self.device,
                "state": str(self.state),
                "version": self.version,
                "ts": float(self.ts),
            }
        )

    @classmethod
    def from_bytes(cls, payload: bytes, limits: Limits = DEFAULT_LIMITS) -> Self:
        f = _open(payload, Kind.STATUS, limits)
        st = cls(
            device=_device(f),
            state=DeviceState(f.str("state", choices=tuple(s.value for s in DeviceState))),
            version=f.int("version", 0, _MAX_ROUND, optional=True),
            ts=f.float("ts", 0.0),
        )
        f.done()
        return st
