"""Local training settings a round asks of devices (``TrainHyper``) and the one table of their
bounds (``HYPER_BOUNDS``) that the envelope, the task reader and the aggregator's config check."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from types import MappingProxyType
from typing import Any

from fedge.errors import InvalidValue, ProtocolError
from fedge.limits import Limits
from fedge.wire import Fields


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
        for name in _ZERO_DEFAULT:  # -0.0 is 0.0: the signed digest has one zero (§5.2.1)
            value = getattr(self, name)
            if isinstance(value, float) and value == 0.0:
                object.__setattr__(self, name, 0.0)
        for name, bounds in HYPER_BOUNDS.items():
            value = getattr(self, name)
            if value not in bounds:
                raise InvalidValue(f"{name} must be in {bounds}, got {value}")
        if self.early_stop_patience and not self.val_fraction:
            raise InvalidValue("early_stop_patience needs val_fraction > 0")

    def to_map(self) -> dict[str, Any]:
        """The wire map: ``epochs``, ``batch_size``, ``lr`` always; every other key only when it
        is not its default (0 / false; optional on the wire, absent reads as the default, and
        the signed digest is over the values, so it is the same either way)."""
        out = asdict(self)
        for name in _ZERO_DEFAULT:
            if not out[name]:
                del out[name]
        if not self.early_stop_patience:
            out.pop("val_fraction", None)
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
            "momentum": real("momentum", optional=True) or 0.0,
            "weight_decay": real("weight_decay", optional=True) or 0.0,
            "prox_mu": real("prox_mu", optional=True) or 0.0,
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


_ZERO_DEFAULT = tuple(
    f.name for f in fields(TrainHyper) if f.name not in ("epochs", "batch_size", "lr")
)
"""The settings whose default is 0 / false: omitted from the wire map at their default."""
