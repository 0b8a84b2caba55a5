"""Named float tensors on the wire: the dense layout every codec builds on.

A tensor record is the msgpack array ``[name, dtype, shape, data]`` where ``dtype`` is a numpy
type string (``"<f4"``, ``"<f2"``), ``shape`` an array of ints and ``data`` little-endian raw
``bin`` of exactly ``prod(shape) * itemsize`` bytes. Decoding checks names, shapes and dtypes
against the model's ``TensorSpec`` and refuses NaN and Inf.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, cast

import msgpack
import numpy as np

from fedge.errors import ProtocolError
from fedge.limits import Limits
from fedge.wire import unpack_bounded

__all__ = [
    "TensorSpec",
    "check_header",
    "decode_records",
    "encode_records",
    "require_finite",
    "spec_of",
    "unpack_records",
]

TensorSpec = Mapping[str, tuple[int, ...]]
"""Ordered tensor names and shapes of a model (its state_dict)."""


def spec_of(state: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(int(d) for d in v.shape) for k, v in state.items()}


def encode_records(records: list[list[Any]]) -> bytes:
    return msgpack.packb(records, use_bin_type=True)


def dense_record(name: str, arr: np.ndarray, dtype: str) -> list[Any]:
    # np.asarray, not ascontiguousarray: the latter turns a 0-d scalar into shape (1,).
    a = np.asarray(arr, dtype=np.dtype(dtype))
    return [name, dtype, list(a.shape), a.tobytes(order="C")]


def unpack_records(blob: bytes, spec: TensorSpec, limits: Limits) -> list[list[Any]]:
    """Decode the outer array of records, bounded by the spec's tensor count."""
    obj = unpack_bounded(
        blob,
        "delta is not a valid tensor array",
        max_array_len=max(len(spec), limits.max_rank, 8),
        max_map_len=0,
        max_str_len=limits.max_str_len,
        max_bin_len=len(blob),
    )
    if not isinstance(obj, list):
        raise ProtocolError("schema", "delta must be an array of tensor records")
    names = [r[0] if isinstance(r, list) and r else None for r in obj]
    if not all(isinstance(n, str) for n in names):
        raise ProtocolError("schema", "every tensor record must start with a string name")
    if sorted(cast(list[str], names)) != sorted(spec) or len(set(names)) != len(names):
        raise ProtocolError(
            "bad_tensor", f"delta tensors {names} do not match the model's {list(spec)}"
        )
    return obj


def check_header(
    rec: list[Any], spec: TensorSpec, allowed: tuple[str, ...], fields: int
) -> tuple[str, str, tuple[int, ...]]:
    """Check a record's length, tag (field 1) and shape (field 2); return name, tag, shape.

    Every record layout starts ``[name, tag, shape, ...]``: dense (``"<f4"``, ``"<f2"``),
    quantized (``"q8"``, ``"q4"``) and sparse (``"topk"``) alike.
    """
    if len(rec) != fields:
        raise ProtocolError("schema", f"tensor record has {len(rec)} fields, expected {fields}")
    name, tag, shape = rec[0], rec[1], rec[2]
    if tag not in allowed:
        raise ProtocolError("bad_tensor", f"{name}: dtype {tag!r} not allowed, expected {allowed}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in shape
    ):
        raise ProtocolError("schema", f"{name}: shape must be an array of ints")
    if tuple(shape) != tuple(spec[name]):
        raise ProtocolError(
            "bad_tensor", f"{name}: shape {shape} != model shape {list(spec[name])}"
        )
    return name, tag, tuple(shape)


def decode_dense(rec: list[Any], spec: TensorSpec, allowed: tuple[str, ...]) -> np.ndarray:
    """One ``[name, dtype, shape, data]`` record -> float32 array of the spec's shape."""
    name, dtype, shape = check_header(rec, spec, allowed, 4)
    data = rec[3]
    if not isinstance(data, bytes):
        raise ProtocolError("schema", f"{name}: data must be bin")
    want = math.prod(shape) * np.dtype(dtype).itemsize
    if len(data) != want:
        raise ProtocolError("bad_tensor", f"{name}: {len(data)} data bytes, expected {want}")
    return np.frombuffer(data, dtype=np.dtype(dtype)).astype(np.float32).reshape(shape)


def require_finite(arrays: Mapping[str, np.ndarray]) -> None:
    for name, a in arrays.items():
        if not np.isfinite(a).all():
            raise ProtocolError("non_finite", f"{name} contains NaN or Inf")


def decode_records(
    blob: bytes, spec: TensorSpec, allowed: tuple[str, ...], limits: Limits
) -> dict[str, np.ndarray]:
    """Dense records -> ``{name: float32 array}`` in spec order, validated and finite."""
    recs = unpack_records(blob, spec, limits)
    by_name = {r[0]: decode_dense(r, spec, allowed) for r in recs}
    out = {k: by_name[k] for k in spec}
    require_finite(out)
    return out
