"""Pruning masks: which weights of the model are live, in the compact form a task carries.

A mask names only the tensors it prunes; every other tensor is fully live. Per tensor it is
one of two forms (protocol §5.2, "mask"):

- ``bits`` (unstructured): ``np.packbits`` of the tensor's keep flags in row-major (C) order,
  most significant bit first, ``ceil(size / 8)`` bytes, the padding bits zero. 1 = live.
- ``cuts`` (structured): per axis, the sorted distinct indices removed along it, as little-endian
  uint32 ``bin``. ``fc1.weight: [[0, <3, 7>]]`` removes rows 3 and 7 (hidden units 3 and 7),
  ``fc2.weight: [[1, <3, 7>]]`` the columns that read them. A weight is live when no cut
  of its tensor covers it.

The device zeroes what is not live before training and after every optimizer step, and sends
the delta of masked tensors as the 1-D vector of their live entries (``live``); the
aggregator puts them back (``scatter``). A cut removes the same slices from the serving model
(``models.shrink``). Pure numpy: no torch, no role.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedge.errors import InvalidValue, ProtocolError
from fedge.tensors import TensorSpec
from fedge.wire import pack

__all__ = ["Keep", "Mask", "live", "live_spec", "scatter", "sparsity"]

Keep = dict[str, np.ndarray]
"""Tensor name -> boolean array of the tensor's shape (True: live), for the masked tensors."""

_Cuts = tuple[tuple[int, tuple[int, ...]], ...]


@dataclass(frozen=True)
class Mask:
    """The weights a round prunes; empty: none (a dense round)."""

    bits: Mapping[str, bytes] = field(default_factory=dict)
    cuts: Mapping[str, _Cuts] = field(default_factory=dict)

    def __post_init__(self) -> None:
        both = set(self.bits) & set(self.cuts)
        if both:
            raise InvalidValue(f"mask: tensors both in bits and cuts: {sorted(both)[:5]}")

    def __bool__(self) -> bool:
        return bool(self.bits or self.cuts)

    @classmethod
    def from_keep(cls, keep: Mapping[str, np.ndarray]) -> Mask:
        """The ``bits`` form of keep flags (tensors with every weight live are left out)."""
        return cls(
            bits={
                k: np.packbits(np.asarray(v, dtype=bool).ravel()).tobytes()
                for k, v in sorted(keep.items())
                if not np.asarray(v).all()
            }
        )

    def keep(self, spec: TensorSpec) -> Keep:
        """Keep flags of the masked tensors; ``InvalidValue`` when the mask does not fit
        ``spec`` (an unknown tensor, a bitmap of another length, an index out of range, a
        tensor left with no live weight)."""
        out: Keep = {}
        for name, raw in self.bits.items():
            shape = _shape(spec, name)
            size = math.prod(shape)
            if len(raw) != (size + 7) // 8:
                raise InvalidValue(f"mask bits of {name!r}: {len(raw)} bytes for {size} weights")
            flags = np.unpackbits(np.frombuffer(raw, dtype=np.uint8))
            if flags[size:].any():
                raise InvalidValue(f"mask bits of {name!r}: padding bits are set")
            out[name] = flags[:size].astype(bool).reshape(shape)
        for name, cuts in self.cuts.items():
            shape = _shape(spec, name)
            k = np.ones(shape, dtype=bool)
            for axis, idx in cuts:
                if not 0 <= axis < len(shape):
                    raise InvalidValue(f"mask cut of {name!r}: axis {axis} of a {len(shape)}-D")
                if idx and not (idx[0] >= 0 and idx[-1] < shape[axis]):
                    raise InvalidValue(f"mask cut of {name!r}: index beyond {shape[axis]}")
                sl: list[Any] = [slice(None)] * len(shape)
                sl[axis] = list(idx)
                k[tuple(sl)] = False
            out[name] = k
        for name, k in out.items():
            if not k.any():
                raise InvalidValue(f"mask leaves no live weight in {name!r}")
        return out

    # -- wire --------------------------------------------------------------------------------
    def to_map(self) -> dict[str, Any]:
        """The task's ``mask`` map, keys sorted (its canonical form)."""
        return {
            "bits": {k: self.bits[k] for k in sorted(self.bits)},
            "cuts": {
                k: [[a, np.asarray(i, "<u4").tobytes()] for a, i in self.cuts[k]]
                for k in sorted(self.cuts)
            },
        }

    @classmethod
    def from_map(cls, obj: Any, max_tensors: int, max_name: int) -> Mask:
        """Read a ``mask`` map off the wire; ``ProtocolError("schema")`` when malformed."""

        def bad(msg: str) -> ProtocolError:
            return ProtocolError("schema", f"task.mask {msg}")

        if not isinstance(obj, dict) or set(obj) != {"bits", "cuts"}:
            raise bad("must be a map of bits and cuts")
        bits, cuts = obj["bits"], obj["cuts"]
        if not isinstance(bits, dict) or not isinstance(cuts, dict):
            raise bad("bits and cuts must be maps")
        if len(bits) + len(cuts) > max_tensors:
            raise bad(f"names more than {max_tensors} tensors")
        for k, v in bits.items():
            if not (isinstance(k, str) and len(k) <= max_name and isinstance(v, bytes)):
                raise bad(f"bits has a bad entry {str(k)[:40]!r}")
        out: dict[str, _Cuts] = {}
        for k, v in cuts.items():
            ok = isinstance(k, str) and len(k) <= max_name and isinstance(v, list) and len(v) <= 8
            if not ok:
                raise bad(f"cuts has a bad entry {str(k)[:40]!r}")
            axes: list[tuple[int, tuple[int, ...]]] = []
            for item in v:
                if not (
                    isinstance(item, list)
                    and len(item) == 2
                    and isinstance(item[0], int)
                    and not isinstance(item[0], bool)
                    and isinstance(item[1], bytes)
                    and len(item[1]) % 4 == 0
                ):
                    raise bad(f"cuts of {k!r} must be [axis, uint32 bin] pairs")
                idx = np.frombuffer(item[1], dtype="<u4")
                if idx.size > 1 and not (np.diff(idx.astype(np.int64)) > 0).all():
                    raise bad(f"cut indices of {k!r} must be sorted and distinct")
                axes.append((item[0], tuple(int(i) for i in idx)))
            out[k] = tuple(axes)
        try:
            return cls(bits=dict(bits), cuts=out)
        except InvalidValue as e:
            raise bad(str(e)) from None

    def digest(self) -> bytes:
        """SHA-256 of the canonical map: what the task signature covers of the mask."""
        return hashlib.sha256(pack(self.to_map())).digest()


def _shape(spec: TensorSpec, name: str) -> tuple[int, ...]:
    if name not in spec:
        raise InvalidValue(f"mask names {name!r}, which the model does not have")
    return tuple(spec[name])


def live(
    delta: Mapping[str, np.ndarray], keep: Keep, names: Collection[str] | None = None
) -> dict[str, np.ndarray]:
    """What a device sends of ``delta``: masked tensors as the 1-D vector of their live
    entries (row-major), others as they are; with ``names`` (a fine-tuning round's trainable
    tensors, ``fedge.trainable``) only those tensors."""
    return {
        k: (v[keep[k]] if k in keep else v) for k, v in delta.items() if names is None or k in names
    }


def live_spec(
    spec: TensorSpec, keep: Keep, names: Collection[str] | None = None
) -> dict[str, tuple[int, ...]]:
    """The shapes ``live`` gives: ``(live count,)`` for masked tensors, only ``names``."""
    return {
        k: ((int(keep[k].sum()),) if k in keep else tuple(s))
        for k, s in spec.items()
        if names is None or k in names
    }


def scatter(
    values: Mapping[str, np.ndarray], keep: Keep, spec: TensorSpec
) -> dict[str, np.ndarray]:
    """The inverse of ``live``: masked tensors back to their shape, zero where pruned, and
    tensors ``live`` left out (frozen in a fine-tuning round) all zero, in ``spec`` order."""
    out: dict[str, np.ndarray] = {}
    for k, shape in spec.items():
        v = values.get(k)
        if v is None:
            out[k] = np.zeros(shape, dtype=np.float32)
        elif k in keep:
            full = np.zeros(shape, dtype=v.dtype)
            full[keep[k]] = v
            out[k] = full
        else:
            out[k] = v
    return out


def sparsity(keep: Keep, spec: TensorSpec) -> float:
    """Pruned weights over all weights of ``spec`` (biases and unmasked tensors count as live)."""
    total = sum(math.prod(s) for s in spec.values())
    pruned = sum(int((~k).sum()) for k in keep.values())
    return pruned / total if total else 0.0
