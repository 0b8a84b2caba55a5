"""The largest blob a codec can validly produce for a model: the cap on a zstd frame.

A ``+zstd`` frame declares its content size; a receiver refuses any declaration larger than
what the round's codec could ever write for the model's tensor spec, before inflating
anything. So a decompression bomb costs at most about one valid blob of memory (proportional
to the model), not the global ``Limits.max_decompressed_bytes`` (256 MiB), which stays as an
upper bound for very large models.

The bound counts the msgpack encoding generously: every header at its widest form (5 bytes
for a str, bin or array header, 9 for an int), every dimension as a 9-byte int, and the values
at their full size (for top-k, ``k = n`` and every index gap at its longest varint).
"""

from __future__ import annotations

import math

from fedge.codecs.values import ValueCodec, num_channels
from fedge.tensors import TensorSpec

__all__ = ["HEADER", "INT", "SHORT_STR", "blob_bound", "dense_bound", "values_bound"]

HEADER = 5  # str32 / bin32 / array32 header: the widest msgpack form
INT = 9  # uint64 / int64
SHORT_STR = HEADER + 16  # a tag such as "<f4", "q8", "topk"


def _record_head(name: str, rank: int) -> int:
    """Record array header, name, tag and shape, each at its widest."""
    return HEADER + HEADER + len(name.encode("utf-8")) + SHORT_STR + HEADER + INT * rank


def values_bound(values: ValueCodec, n: int, channels: int) -> int:
    """The value fields of ``n`` numbers in ``channels`` channels (scales for int8/int4)."""
    data = HEADER + values.data_len(n)
    return data if values.fields == 1 else data + HEADER + 4 * channels


def blob_bound(spec: TensorSpec, per_tensor: dict[str, int]) -> int:
    """The blob's array header plus, per tensor, its record head and ``per_tensor`` bytes."""
    return HEADER + sum(_record_head(k, len(s)) + per_tensor[k] for k, s in spec.items())


def dense_bound(spec: TensorSpec, values: ValueCodec) -> int:
    return blob_bound(
        spec,
        {k: values_bound(values, math.prod(s), num_channels(s)) for k, s in spec.items()},
    )
