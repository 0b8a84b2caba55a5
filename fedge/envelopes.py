"""The four messages of wire contract v1, as frozen dataclasses.

Each has ``to_bytes()`` and a validating ``from_bytes(payload, limits)``. On the wire an
envelope is a msgpack map with ``v`` (schema version) and ``kind``; tensors travel inside the
codec blob as ``bin``. ``docs/protocol.md`` is the normative description.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Self

from fedge.errors import InvalidValue, ProtocolError
from fedge.limits import DEFAULT_LIMITS, Limits
from fedge.topics import validate_device_id
from fedge.wire import Fields, open_envelope, pack

__all__ = [
    "HYPER_BOUNDS",
    "SCHEMA_VERSION",
    "Bounds",
    "DeviceState",
    "DeviceStatus",
    "GlobalModel",
    "Kind",
    "ModelArch",
    "ModelChunk",
    "ModelUpdate",
    "Receipt",
    "RoundTask",
    "TrainHyper",
]

SCHEMA_VERSION = 1
NONCE_BYTES = 16
SIGNATURE_BYTES = 64
_MAX_ROUND = 2**31


class Kind(StrEnum):
    TASK = "task"
    UPDATE = "update"
    MODEL = "model"
    CHUNK = "chunk"
    STATUS = "status"
    RECEIPT = "receipt"


class DeviceState(StrEnum):
    ONLINE = "online"
    TRAINING = "training"
    OFFLINE = "offline"


def _open(payload: bytes, kind: Kind, limits: Limits) -> Fields:
    return open_envelope(payload, str(kind), SCHEMA_VERSION, limits)


def _device(f: Fields, key: str = "device") -> str:
    d = f.str(key)
    try:
        return validate_device_id(d)
    except InvalidValue as e:
        raise ProtocolError("schema", str(e)) from None


@dataclass(frozen=True)
class Bounds:
    """Where a number may lie: from ``lo`` to ``hi``, an end excluded when it is ``*_open``."""

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = self.lo < value if self.lo_open else self.lo <= value
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def __str__(self) -> str:
        return f"{'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"


HYPER_BOUNDS: Mapping[str, Bounds] = MappingProxyType(
    {
        "epochs": Bounds(1, 1000),
        "batch_size": Bounds(1, 65536),
        "lr": Bounds(0, 100, lo_open=True),
        "momentum": Bounds(0, 10**6, hi_open=True),
        "weight_decay": Bounds(0, 10**6, hi_open=True),
        "prox_mu": Bounds(0, 10**6, hi_open=True),
        "early_stop_patience": Bounds(0, 1000),
        "val_fraction": Bounds(0, 0.5),
    }
)
"""The range of every numeric ``TrainHyper`` field: the one table that the dataclass, the
task envelope's reader and the aggregator's config (``aggregator.config``) all check."""


@dataclass(frozen=True)
class TrainHyper:
    """Local training settings a round asks of devices; ``InvalidValue`` outside
    ``HYPER_BOUNDS``."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    prox_mu: float = 0.0
    qat: bool = False  # train with fake quantization (models/qat.py)
    calibrate: bool = False  # report activation ranges for the int8 export
    # Early stopping on local validation: hold out val_fraction of the local data and stop
    # after early_stop_patience epochs without a better validation loss (0 = off).
    early_stop_patience: int = 0
    val_fraction: float = 0.0

    def __post_init__(self) -> None:
        for name, bounds in HYPER_BOUNDS.items():
            value = getattr(self, name)
            if value not in bounds:
                raise InvalidValue(f"{name} must be in {bounds}, got {value}")
        if self.early_stop_patience and not self.val_fraction:
            raise InvalidValue("early_stop_patience needs val_fraction > 0")

    def to_map(self) -> dict[str, Any]:
        """The wire map; the early-stopping keys only when it is on (optional on the wire)."""
        out = asdict(self)
        if not self.early_stop_patience:
            del out["early_stop_patience"], out["val_fraction"]
        return out

    @classmethod
    def _read(cls, raw: Any, limits: Limits) -> TrainHyper:
        if not isinstance(raw, dict):
            raise ProtocolError("schema", "task.hyper must be a map")
        f = Fields(raw, "task.hyper", limits)

        # Fields checks the closed range; the dataclass then refuses an open end (lr = 0).
        def whole(key: str, *, optional: bool = False) -> Any:
            b = HYPER_BOUNDS[key]
            return f.int(key, int(b.lo), int(b.hi), optional=optional)

        def real(key: str, *, optional: bool = False) -> Any:
            b = HYPER_BOUNDS[key]
            return f.float(key, b.lo, b.hi, optional=optional)

        vals = {
            "epochs": whole("epochs"),
            "batch_size": whole("batch_size"),
            "lr": real("lr"),
            "momentum": real("momentum"),
            "weight_decay": real("weight_decay"),
            "prox_mu": real("prox_mu"),
            "qat": f.bool("qat", optional=True) or False,
            "calibrate": f.bool("calibrate", optional=True) or False,
            "early_stop_patience": whole("early_stop_patience", optional=True) or 0,
            "val_fraction": real("val_fraction", optional=True) or 0.0,
        }
        f.done()
        try:
            return cls(**vals)
        except InvalidValue as e:
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
    # Async mode: the oldest round whose updates are still accepted (None: this round only).
    # A device keeps unreceipted updates of rounds from here on in its outbox.
    accepts_from: int | None = None
    # Ed25519 by the aggregator over digest(): every field above. Empty when the fleet does
    # not sign; then it is not sent at all (an optional key added after v1's freeze).
    signature: bytes = b""

    def __post_init__(self) -> None:
        if self.accepts_from is not None and not 1 <= self.accepts_from <= self.round:
            raise InvalidValue(f"accepts_from must be in [1, round], got {self.accepts_from}")

    def asks(self, device: str) -> bool:
        return self.selected is None or device in self.selected

    @property
    def oldest_accepted(self) -> int:
        """The oldest round an update may still answer."""
        return self.round if self.accepts_from is None else self.accepts_from

    def digest(self) -> bytes:
        """What the aggregator signs: fedge.identity.task_digest over every field."""
        from fedge.identity import task_digest

        h = self.hyper
        return task_digest(
            self.round,
            self.base_version,
            deadline=self.deadline,
            issued=self.issued,
            codec=self.codec,
            hyper=(
                h.epochs,
                h.batch_size,
                h.lr,
                h.momentum,
                h.weight_decay,
                h.prox_mu,
                h.qat,
                h.calibrate,
                h.early_stop_patience,
                h.val_fraction,
            ),
            nonce=self.nonce,
            selected=self.selected,
            accepts_from=self.accepts_from,
        )

    def to_bytes(self) -> bytes:
        extra: dict[str, Any] = {}
        if self.accepts_from is not None:
            extra["accepts_from"] = self.accepts_from
        if self.signature:
            extra["signature"] = self.signature
        return pack(
            {
                "v": SCHEMA_VERSION,
                "kind": str(Kind.TASK),
                "round": self.round,
                "base_version": self.base_version,
                "deadline": float(self.deadline),
                "issued": float(self.issued),
                "codec": self.codec,
                "hyper": self.hyper.to_map(),
                "nonce": self.nonce,
                "selected": list(self.selected) if self.selected is not None else None,
                **extra,
            }
        )

    @classmethod
    def from_bytes(cls, payload: bytes, limits: Limits = DEFAULT_LIMITS) -> Self:
        f = _open(payload, Kind.TASK, limits)
        round_id = f.int("round", 1, _MAX_ROUND)
        accepts_from = f.int("accepts_from", 1, round_id, optional=True)
        task = cls(
            round=round_id,
            base_version=f.int("base_version", 0, _MAX_ROUND),
            deadline=f.float("deadline", 0.0),
            issued=f.float("issued", 0.0),
            codec=f.str("codec"),
            hyper=TrainHyper._read(f.map("hyper"), limits),
            nonce=_nonce(f),
            selected=_opt_tuple(f.str_list("selected", optional=True)),
            accepts_from=accepts_from,
            signature=f.bytes("signature", max_len=SIGNATURE_BYTES, optional=True) or b"",
        )
        f.done()
        return task


def _nonce(f: Fields) -> bytes:
    n: bytes = f.bytes("nonce", max_len=NONCE_BYTES)
    if len(n) != NONCE_BYTES:
        raise ProtocolError("schema", f"nonce must be exactly {NONCE_BYTES} bytes, got {len(n)}")
    return n


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
    signature: bytes = b""  # Ed25519 over digest(); empty when the fleet does not sign
    # Activation ranges of the device's data through the base model: tensor -> (min, max).
    calib: dict[str, tuple[float, float]] = field(default_factory=dict)

    def digest(self) -> bytes:
        """What the device signs: fedge.identity.update_digest over this update's fields."""
        import hashlib

        from fedge.identity import update_digest

        return update_digest(
            self.device,
            self.round,
            self.nonce,
            hashlib.sha256(self.delta).digest(),
            base_version=self.base_version,
            num_samples=self.num_samples,
            codec=self.codec,
            calib=self.calib,
        )

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
                "signature": self.signature,
                "calib": {k: [float(lo), float(hi)] for k, (lo, hi) in self.calib.items()},
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
            nonce=_nonce(f),
            # Not clamped here: the aggregator clamps to its own bound and counts the event.
            num_samples=f.int("num_samples", 1, 2**62),
            codec=f.str("codec"),
            delta=f.bytes("delta", max_len=limits.max_payload_bytes),
            metrics=f.number_map("metrics"),
            signature=f.bytes("signature", max_len=SIGNATURE_BYTES, optional=True) or b"",
            calib=f.range_map("calib"),
        )
        f.done()
        return upd


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


def _opt(v: int | None, default: int) -> int:
    return default if v is None else v


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


@dataclass(frozen=True)
class Receipt:
    """The aggregator's word that an update is durably recorded: until it arrives the device
    keeps the update in its outbox and resends it after every reconnect (the broker's PUBACK
    alone is not enough: a broker crash can lose a message in flight to the aggregator)."""

    device: str
    round: int
    update_id: str

    def to_bytes(self) -> bytes:
        return pack(
            {
                "v": SCHEMA_VERSION,
                "kind": str(Kind.RECEIPT),
                "device": self.device,
                "round": self.round,
                "update_id": self.update_id,
            }
        )

    @classmethod
    def from_bytes(cls, payload: bytes, limits: Limits = DEFAULT_LIMITS) -> Self:
        f = _open(payload, Kind.RECEIPT, limits)
        r = cls(
            device=_device(f), round=f.int("round", 1, _MAX_ROUND), update_id=f.str("update_id")
        )
        f.done()
        return r
