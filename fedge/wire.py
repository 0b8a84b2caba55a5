"""Safe msgpack at the boundary, and typed reading of an untrusted map.

``unpack_bounded`` (the one msgpack decoder of untrusted bytes; ``unpack_map`` for envelopes,
``fedge.tensors`` for tensor records) bounds every declared length before msgpack allocates,
refuses ExtType and non-string keys, and turns every msgpack failure into
``ProtocolError('bad_msgpack')``.
``Fields`` reads a decoded map with type and range checks and refuses unknown keys, so an
envelope's ``from_bytes`` is a list of one-line field reads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NoReturn, TypeAlias

import msgpack

from fedge.errors import ProtocolError
from fedge.limits import Limits

__all__ = ["Fields", "open_envelope", "pack", "unpack_bounded", "unpack_map"]


def pack(obj: Mapping[str, Any]) -> bytes:
    """msgpack with ``bin`` for bytes and ``str`` for text (use_bin_type)."""
    return msgpack.packb(obj, use_bin_type=True)


def _no_ext(code: int, data: bytes) -> NoReturn:
    raise ProtocolError("bad_msgpack", f"ExtType {code} is not allowed")


# UnpackValueError (truncated data) subclasses ValueError.
_MSGPACK_ERRORS = (
    ValueError,
    TypeError,
    msgpack.ExtraData,
    msgpack.FormatError,
    msgpack.StackError,
)


def unpack_bounded(
    blob: bytes,
    error: str,
    *,
    max_array_len: int,
    max_map_len: int,
    max_str_len: int,
    max_bin_len: int,
) -> Any:
    """Decode one untrusted msgpack object, every declared length bounded before msgpack
    allocates; ExtType and non-string map keys are refused. Any failure is
    ``ProtocolError('bad_msgpack', f"{error}: ...")``."""
    try:
        return msgpack.unpackb(
            blob,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_no_ext,
            max_bin_len=max_bin_len,
            max_str_len=max_str_len,
            max_array_len=max_array_len,
            max_map_len=max_map_len,
            max_ext_len=0,
        )
    except ProtocolError:
        raise
    except _MSGPACK_ERRORS as e:
        raise ProtocolError("bad_msgpack", f"{error}: {e}") from None


def unpack_map(payload: bytes, limits: Limits, *, what: str = "message") -> dict[str, Any]:
    """Decode one msgpack map from an untrusted payload, within ``limits``."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise ProtocolError("schema", f"{what} payload is {type(payload).__name__}, not bytes")
    if len(payload) > limits.max_payload_bytes:
        raise ProtocolError(
            "too_large", f"{what} is {len(payload)} bytes, limit {limits.max_payload_bytes}"
        )
    obj = unpack_bounded(
        payload,
        f"{what} is not valid msgpack",
        max_bin_len=limits.max_payload_bytes,
        max_str_len=limits.max_str_len * 64,
        max_array_len=limits.max_array_len,
        max_map_len=max(limits.max_map_len, limits.max_tensors),
    )
    if not isinstance(obj, dict):
        raise ProtocolError("schema", f"{what} must be a msgpack map, got {type(obj).__name__}")
    return obj


# Fields has methods named str, int, float, bool: annotations inside the class use these.
_Str: TypeAlias = str
_Int: TypeAlias = int
_Float: TypeAlias = float
_Bool: TypeAlias = bool


class Fields:
    """Typed, range-checked access to an untrusted decoded map.

    Call ``done()`` last: keys never read are unknown keys and are refused.
    """

    def __init__(self, obj: Mapping[str, Any], what: str, limits: Limits) -> None:
        self._obj = obj
        self._what = what
        self._limits = limits
        self._seen: set[str] = set()

    def _bad(self, key: str, msg: str) -> NoReturn:
        raise ProtocolError("schema", f"{self._what}.{key} {msg}")

    def _get(self, key: str, optional: bool) -> Any:
        self._seen.add(key)
        if key not in self._obj:
            if optional:
                return None
            self._bad(key, "is missing")
        return self._obj[key]

    def int(self, key: str, lo: int = 0, hi: int = 2**63 - 1, *, optional: bool = False) -> Any:
        v = self._get(key, optional)
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            self._bad(key, f"must be an int, got {type(v).__name__}")
        if not lo <= v <= hi:
            self._bad(key, f"= {v} is outside [{lo}, {hi}]")
        return v

    def float(
        self, key: str, lo: float = -math.inf, hi: float = math.inf, *, optional: bool = False
    ) -> Any:
        v = self._get(key, optional)
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, int | float):
            self._bad(key, f"must be a number, got {type(v).__name__}")
        v = float(v)
        if not math.isfinite(v) or not lo <= v <= hi:
            self._bad(key, f"= {v} is not finite or outside [{lo}, {hi}]")
        return v

    def str(self, key: str, *, optional: bool = False, choices: tuple[str, ...] = ()) -> Any:
        v = self._get(key, optional)
        if v is None and optional:
            return None
        if not isinstance(v, str):
            self._bad(key, f"must be a string, got {type(v).__name__}")
        if len(v) > self._limits.max_str_len:
            self._bad(key, f"is longer than {self._limits.max_str_len} characters")
        if choices and v not in choices:
            self._bad(key, f"= {v!r} is not one of {', '.join(choices)}")
        return v

    def bytes(self, key: _Str, *, max_len: _Int | None = None, optional: _Bool = False) -> Any:
        v = self._get(key, optional)
        if v is None and optional:
            return None
        if not isinstance(v, bytes):
            self._bad(key, f"must be bin, got {type(v).__name__}")
        if max_len is not None and len(v) > max_len:
            self._bad(key, f"is {len(v)} bytes, limit {max_len}")
        return v

    def str_list(self, key: _Str, *, optional: _Bool = False) -> Any:
        v = self._get(key, optional)
        if v is None and optional:
            return None
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            self._bad(key, "must be an array of strings")
        if any(len(s) > self._limits.max_str_len for s in v):
            self._bad(key, f"has an item longer than {self._limits.max_str_len} characters")
        return v

    def number_map(self, key: _Str, *, optional: _Bool = True) -> dict[_Str, _Float]:
        """A flat map of short string keys to finite numbers (metrics)."""
        v = self._get(key, optional)
        if v is None:
            return {}
        if not isinstance(v, dict) or len(v) > self._limits.max_map_len:
            self._bad(key, f"must be a map of at most {self._limits.max_map_len} numbers")
        out: dict[_Str, _Float] = {}
        for k, x in v.items():
            ok_k = isinstance(k, str) and len(k) <= 64
            ok_x = isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
            if not (ok_k and ok_x):
                self._bad(key, f"has a bad entry {k!r}: {x!r}")
            out[k] = float(x)
        return out

    def bool(self, key: _Str, *, optional: _Bool = False) -> Any:
        v = self._get(key, optional)
        if v is None and optional:
            return None
        if not isinstance(v, bool):
            self._bad(key, f"must be a boolean, got {type(v).__name__}")
        return v

    def range_map(self, key: _Str) -> dict[_Str, tuple[_Float, _Float]]:
        """Optional map of tensor name -> [min, max] (finite, min <= max)."""
        v = self._get(key, True)
        if v is None:
            return {}
        if not isinstance(v, dict) or len(v) > self._limits.max_tensors:
            self._bad(key, f"must be a map of at most {self._limits.max_tensors} ranges")
        out: dict[_Str, tuple[_Float, _Float]] = {}
        for k, r in v.items():
            ok = (
                isinstance(k, str)
                and len(k) <= self._limits.max_str_len
                and isinstance(r, list)
                and len(r) == 2
                and all(isinstance(x, int | float) and not isinstance(x, bool) for x in r)
                and all(math.isfinite(x) for x in r)
                and r[0] <= r[1]
            )
            if not ok:
                self._bad(key, f"has a bad range {k!r}: {r!r}")
            out[k] = (float(r[0]), float(r[1]))
        return out

    def map(self, key: _Str, *, optional: _Bool = False) -> Any:
        v = self._get(key, optional)
        if v is None and optional:
            return None
        if not isinstance(v, dict):
            self._bad(key, f"must be a map, got {type(v).__name__}")
        return v

    def raw(self, key: _Str) -> Any:
        """A required value as decoded, for a caller that validates its structure itself."""
        return self._get(key, False)

    def done(self) -> None:
        extra = set(self._obj) - self._seen
        if extra:
            raise ProtocolError(
                "schema", f"{self._what} has unknown keys: {', '.join(sorted(map(str, extra)))}"
            )


def open_envelope(payload: bytes, kind: str, version: int, limits: Limits) -> Fields:
    """Unpack a message map and check its common header: ``v`` (schema version) equals
    ``version`` (else ``version``), and ``kind`` is ``kind`` (else ``schema``)."""
    f = Fields(unpack_map(payload, limits, what=kind), kind, limits)
    v = f.int("v", 0, 2**16)
    if v != version:
        raise ProtocolError("version", f"{kind} schema version {v}, this peer speaks {version}")
    got = f.str("kind")
    if got != kind:
        raise ProtocolError("schema", f"expected kind {kind!r}, got {got!r}")
    return f
