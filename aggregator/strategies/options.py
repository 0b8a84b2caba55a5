"""Typed strategy options built from ``KEY=VALUE`` strings (command line) or YAML scalars.

Each strategy declares a frozen dataclass of options; every field has a default and a
``help`` in its metadata. :func:`build_options` converts and validates raw values and raises
``InvalidValue`` (``fedge.errors``, a ``ValueError`` too) with messages that name the strategy,
the option and the valid choices.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple, TypeVar

from fedge.errors import InvalidValue

__all__ = [
    "OptionInfo",
    "StrategyOptions",
    "build_options",
    "describe_options",
    "opt",
    "parse_option_pairs",
]

OptionsT = TypeVar("OptionsT", bound="StrategyOptions")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def opt(default: Any, help: str) -> Any:
    """A dataclass field with a default and a one-line help text."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class StrategyOptions:
    """Options every strategy has."""

    server_lr: float = opt(1.0, "server learning rate: new = old + server_lr * step")
    clip_norm: float = opt(0.0, "scale each update to L2 norm <= clip_norm (0 = off)")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise InvalidValue(f"{f.name} must be a finite number, got {v}")
        if self.server_lr < 0:
            raise InvalidValue(f"server_lr must be >= 0, got {self.server_lr}")
        if self.clip_norm < 0:
            raise InvalidValue(f"clip_norm must be >= 0 (0 = off), got {self.clip_norm}")


class OptionInfo(NamedTuple):
    key: str
    default: str
    help: str


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return format(v, "g") if isinstance(v, float) else str(v)


def describe_options(cls: type[StrategyOptions]) -> tuple[OptionInfo, ...]:
    return tuple(
        OptionInfo(f.name, _fmt(f.default), f.metadata.get("help", ""))
        for f in dataclasses.fields(cls)
    )


def _convert(strategy: str, key: str, typ: Any, raw: Any) -> Any:
    what = f"strategy {strategy!r}: option {key}"
    if typ is bool:
        if isinstance(raw, bool):
            return raw
        s = str(raw).strip().lower()
        if s in _TRUE | _FALSE:
            return s in _TRUE
        raise InvalidValue(f"{what} must be true or false, got {raw!r}")
    if typ is int:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise InvalidValue(f"{what} must be an integer, got {raw!r}")
        try:
            return int(raw) if not isinstance(raw, str) else int(raw.strip())
        except ValueError:
            raise InvalidValue(f"{what} must be an integer, got {raw!r}") from None
    if typ is float:
        if isinstance(raw, bool):
            raise InvalidValue(f"{what} must be a number, got {raw!r}")
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise InvalidValue(f"{what} must be a number, got {raw!r}") from None
    if typ is str:
        return str(raw).strip()
    raise TypeError(f"unsupported option type {typ!r} for {key}")  # a bug in a strategy


def build_options(cls: type[OptionsT], strategy: str, raw: Mapping[str, Any] | None) -> OptionsT:
    """Convert ``{"tau": "1e-3"}`` to ``cls(tau=0.001)``; ``InvalidValue`` says what to write."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    valid = ", ".join(f"{i.key}={i.default}" for i in describe_options(cls))
    values: dict[str, Any] = {}
    for key, value in (raw or {}).items():
        k = str(key).strip().replace("-", "_")
        if k not in fields:
            raise InvalidValue(
                f"strategy {strategy!r} has no option {key!r}; valid options (defaults): {valid}"
            )
        values[k] = _convert(strategy, k, fields[k], value)
    try:
        return cls(**values)
    except ValueError as e:
        raise InvalidValue(f"strategy {strategy!r}: {e}") from None


def parse_option_pairs(pairs: Iterable[str]) -> dict[str, str]:
    """``["tau=1e-3", "beta1=0.9"]`` -> ``{"tau": "1e-3", "beta1": "0.9"}``."""
    out: dict[str, str] = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key.strip():
            raise InvalidValue(f"strategy option {p!r} must look like KEY=VALUE, e.g. tau=0.001")
        if key.strip() in out:
            raise InvalidValue(f"strategy option {key.strip()!r} given twice")
        out[key.strip()] = value.strip()
    return out
