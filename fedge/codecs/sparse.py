"""Top-k sparsification ``topk:F+VALUE``: only the largest-magnitude entries of a delta.

Blob: a msgpack array of tensor records, one per model tensor, in any order (names = the
model's tensor set, no maps, no trailing bytes). Each record is a msgpack array of
``6 + f`` fields, ``f`` = 1 for fp32/fp16 values and 2 for int8/int4::

    [name: str, "topk", shape: array of int, k: int, indices: bin, vtag: str, *value fields]

- ``shape`` MUST equal the model's; let ``n = prod(shape)`` (``[]`` -> 1).
- ``k``: number of entries sent, ``0 <= k <= n`` (else ``bad_count``). Every other entry
  of the tensor is 0.
- ``indices``: the ``k`` flat (C-order) indices, strictly increasing, as ``k`` gaps
  ``g_i = idx_i - idx_{i-1}`` with ``idx_{-1} = -1`` (so every gap is >= 1), each an
  unsigned LEB128 varint: 7 bits per byte, least significant group first, high bit set on
  every byte but the last. Rules (else ``bad_index``): exactly ``k`` varints and no byte
  more (a count that does not match -> ``bad_count``); each varint minimal (no trailing
  ``0x00`` group) and at most ``ceil(bitlen(n) / 7)`` bytes (a gap is <= n); no gap of 0
  (a duplicate; an unsorted list cannot be written); the last index ``< n``.
- ``vtag`` and the value fields: the ``k`` kept values in index order, encoded as a 1-D
  tensor of shape ``[k]`` by the value codec (``"<f4"``, ``"<f2"``, ``"q8"``, ``"q4"``; see
  ``fedge.codecs.values``); a 1-D tensor has one scale. A value data length that does not
  match ``k`` -> ``bad_count``.

What fedge's encoder sends (a receiver accepts any valid ``k`` per record): one **global**
top-k over the whole delta, ``K = min(nnz, ceil(F·N))`` entries of largest ``|x|`` among all
``N`` elements of all tensors (``nnz`` = the non-zero ones), each sent in its own tensor's
record; a tensor can get ``k = 0``.

Why global selection: a layer whose update is large this round gets more of the budget, and
error feedback on the device brings every other coordinate in later, so no tensor starves
for long. Measured on digits (MLP, 10 devices, Dirichlet(0.5), 30 rounds, 3 seeds, same
bytes): global vs per-tensor top-k final accuracy 0.929 vs 0.920 at ``topk:0.01+int8+zstd``,
0.940 vs 0.938 at ``topk:0.02+int4+zstd``, equal (0.945) at ``topk:0.03+int4+zstd``. The
records stay per tensor, so the kept values of each tensor get a scale of their own (a
single vector across layers would mix magnitudes orders apart), and each record validates on
its own, bounded by its own spec size.

Example: ``linear.weight`` = [[0, -0.25], [0, 1.0]] as ``topk:0.5+fp32`` keeps indices 1
and 3 (gaps 2, 2): ``97 ad 'linear.weight' a4 'topk' 92 02 02 02 c4 02 02 02 a3 '<f4'
c4 08 00 00 80 be 00 00 80 3f``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedge.codecs.values import ValueCodec
from fedge.errors import ProtocolError
from fedge.limits import Limits
from fedge.tensors import TensorSpec, check_header, encode_records, require_finite, unpack_records

__all__ = ["TopKCodec", "decode_gaps", "encode_gaps", "select_topk"]

TAG = "topk"


def select_topk(flats: list[np.ndarray], fraction: float) -> list[np.ndarray]:
    """Per tensor, the sorted flat indices of the global ``min(nnz, ceil(fraction * N))``
    largest ``|x|`` over all ``N`` elements of ``flats``."""
    sizes = [f.size for f in flats]
    mag = np.abs(np.concatenate(flats)) if flats else np.zeros(0, np.float32)
    n = mag.size
    nonzero = np.flatnonzero(mag)
    k = min(len(nonzero), math.ceil(fraction * n))
    chosen = nonzero if k == len(nonzero) else np.sort(np.argpartition(mag, n - k)[n - k :])
    bounds = np.cumsum([0, *sizes])
    cuts = np.searchsorted(chosen, bounds)
    return [chosen[cuts[i] : cuts[i + 1]] - bounds[i] for i in range(len(flats))]


def varint_max_len(n: int) -> int:
    """Bytes of the longest gap a tensor of ``n`` elements can need (the gap is <= n)."""
    return max(1, math.ceil(int(n).bit_length() / 7))


def encode_gaps(idx: np.ndarray) -> bytes:
    """Strictly increasing indices -> LEB128 varints of their gaps (``idx_{-1} = -1``)."""
    gaps = np.diff(np.asarray(idx, dtype=np.int64), prepend=-1).astype(np.uint64)
    if len(gaps) == 0:
        return b""
    sizes = np.ones(len(gaps), dtype=np.int64)
    for j in range(1, 10):
        sizes += gaps >= np.uint64(1 << (7 * j))
    starts = np.cumsum(sizes) - sizes
    out = np.zeros(int(sizes.sum()), dtype=np.uint8)
    for j in range(int(sizes.max())):
        sel = sizes > j
        group = (gaps[sel] >> np.uint64(7 * j)) & np.uint64(0x7F)
        more = (sizes[sel] > j + 1).astype(np.uint64) << np.uint64(7)
        out[starts[sel] + j] = (group | more).astype(np.uint8)
    return out.tobytes()


def decode_gaps(buf: bytes, k: int, n: int, what: str) -> np.ndarray:
    """LEB128 gaps -> ``k`` strictly increasing int64 indices ``< n``, or ``ProtocolError``.

    The work is bounded by ``k * varint_max_len(n)`` bytes, and ``k <= n`` was checked: the
    model spec, not the peer, bounds the memory.
    """
    longest = varint_max_len(n)
    if len(buf) > k * longest:
        raise ProtocolError(
            "bad_index", f"{what}: {len(buf)} index bytes, at most {k * longest} for {k} indices"
        )
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    b = np.frombuffer(buf, dtype=np.uint8)
    if len(b) == 0 or b[-1] & 0x80:
        raise ProtocolError("bad_index", f"{what}: index varints truncated")
    ends = np.flatnonzero(b < 0x80)
    if len(ends) != k:
        raise ProtocolError("bad_count", f"{what}: {len(ends)} indices, record declares k={k}")
    starts = np.concatenate(([0], ends[:-1] + 1))
    sizes = ends - starts + 1
    if sizes.max() > longest:
        raise ProtocolError("bad_index", f"{what}: index varint longer than {longest} bytes")
    if ((sizes > 1) & (b[ends] == 0)).any():
        raise ProtocolError("bad_index", f"{what}: index varint not minimal")
    pos = (np.arange(len(b)) - np.repeat(starts, sizes)).astype(np.uint64)
    parts = (b & 0x7F).astype(np.uint64) << (np.uint64(7) * pos)
    gaps = np.add.reduceat(parts, starts)
    if (gaps == 0).any():
        raise ProtocolError("bad_index", f"{what}: duplicate index (gap 0)")
    idx = np.cumsum(gaps.astype(np.int64)) - 1
    if idx[-1] >= n:
        raise ProtocolError(
            "bad_index", f"{what}: index {int(idx[-1])} out of range for {n} elements"
        )
    return idx


class TopKCodec:
    """``topk:F+VALUE``: an entry not sent errs by <= the largest |x| not sent in the whole
    delta; a sent one by VALUE's error (one scale per tensor for int8/int4)."""

    def __init__(self, fraction: float, values: ValueCodec) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"topk fraction must lie in (0, 1], got {fraction}")
        self.fraction = float(fraction)
        self.values = values
        self.name = f"topk:{self.fraction!r}+{values.name}"
        self.lossless = self.fraction >= 1 and values.lossless

    def encode(
        self, delta: Mapping[str, np.ndarray], rng: np.random.Generator | None = None
    ) -> bytes:
        rng = rng if rng is not None else np.random.default_rng()
        arrays = {name: np.asarray(a, dtype=np.float32) for name, a in delta.items()}
        flats = [a.reshape(-1) for a in arrays.values()]
        records = []
        for (name, arr), flat, idx in zip(
            arrays.items(), flats, select_topk(flats, self.fraction), strict=True
        ):
            fields = self.values.encode_fields(flat[idx], rng)
            shape = [int(d) for d in arr.shape]
            records.append([name, TAG, shape, len(idx), encode_gaps(idx), self.values.tag, *fields])
        return encode_records(records)

    def max_blob_bytes(self, spec: TensorSpec) -> int:
        """The largest valid blob for ``spec``: every entry kept, every gap at its longest."""
        from fedge.codecs.bounds import HEADER, INT, SHORT_STR, blob_bound, values_bound

        per = {}
        for name, shape in spec.items():
            n = math.prod(shape)
            indices = HEADER + n * varint_max_len(n)
            per[name] = INT + indices + SHORT_STR + values_bound(self.values, n, 1)
        return blob_bound(spec, per)

    def decode(self, blob: bytes, spec: TensorSpec, limits: Limits) -> dict[str, np.ndarray]:
        by_name = {}
        for rec in unpack_records(blob, spec, limits):
            by_name[rec[0]] = self._decode_record(rec, spec)
        out = {k: by_name[k] for k in spec}
        require_finite(out)
        return out

    def _decode_record(self, rec: list, spec: TensorSpec) -> np.ndarray:
        v = self.values
        name, _, shape = check_header(rec, spec, (TAG,), 6 + v.fields)
        k, indices, vtag = rec[3], rec[4], rec[5]
        n = math.prod(shape)
        if not isinstance(k, int) or isinstance(k, bool):
            raise ProtocolError("schema", f"{name}: k must be an int")
        if not 0 <= k <= n:
            raise ProtocolError("bad_count", f"{name}: k={k} outside [0, {n}]")
        if not isinstance(indices, bytes):
            raise ProtocolError("schema", f"{name}: indices must be bin")
        if vtag != v.tag:
            raise ProtocolError("bad_tensor", f"{name}: values {vtag!r}, codec uses {v.tag!r}")
        data = rec[-1]
        if isinstance(data, bytes) and len(data) != v.data_len(k):
            raise ProtocolError(
                "bad_count", f"{name}: {len(data)} value bytes, expected {v.data_len(k)} for k={k}"
            )
        idx = decode_gaps(indices, k, n, name)
        values = v.decode_fields(rec[6:], (k,), name)
        out = np.zeros(n, dtype=np.float32)
        out[idx] = values
        return out.reshape(shape)
