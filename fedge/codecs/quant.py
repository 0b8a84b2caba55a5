"""Dense quantized codecs ``int8`` and ``int4``: every element sent as a small integer.

Blob: a msgpack array of tensor records, one per model tensor, in any order (the rules of
the dense layout apply: names = the model's tensor set, no maps, no trailing bytes). Each
record is a 5-element msgpack array::

    [name: str, tag: str, shape: array of int, scales: bin, data: bin]

``tag`` is ``"q8"`` for ``int8`` and ``"q4"`` for ``int4``; ``shape`` MUST equal the model's;
``scales`` and ``data`` are laid out as in ``fedge.codecs.values`` (one binary32 scale per
output channel, i.e. per index of the first axis when rank >= 2, else one scale; int8 codes,
or int4 codes two per byte, low nibble first).

Example: ``linear.weight`` = [[0.5, -0.25], [0.125, 1.0]] as ``int8`` with
scales [0.5/127, 1/127] is ``95 ad 'linear.weight' a2 'q8' 92 02 02
c4 08 <2 x binary32 LE> c4 04 <4 x int8>``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedge.codecs.values import QuantValues
from fedge.limits import Limits
from fedge.tensors import TensorSpec, check_header, encode_records, require_finite, unpack_records

__all__ = ["QuantCodec"]


class QuantCodec:
    """``int8`` / ``int4``: error per element below its channel's scale, unbiased."""

    lossless = False

    def __init__(self, values: QuantValues) -> None:
        self.values = values
        self.name = values.name

    def encode(
        self, delta: Mapping[str, np.ndarray], rng: np.random.Generator | None = None
    ) -> bytes:
        rng = rng if rng is not None else np.random.default_rng()
        v = self.values
        return encode_records(
            [
                [name, v.tag, [int(d) for d in np.shape(a)], *v.encode_fields(a, rng)]
                for name, a in delta.items()
            ]
        )

    def max_blob_bytes(self, spec: TensorSpec) -> int:
        """The largest valid blob for ``spec`` (fedge.codecs.bounds)."""
        from fedge.codecs.bounds import dense_bound

        return dense_bound(spec, self.values)

    def decode(self, blob: bytes, spec: TensorSpec, limits: Limits) -> dict[str, np.ndarray]:
        v = self.values
        by_name = {}
        for rec in unpack_records(blob, spec, limits):
            name, _, shape = check_header(rec, spec, (v.tag,), 3 + v.fields)
            by_name[name] = v.decode_fields(rec[3:], shape, name)
        out = {k: by_name[k] for k in spec}
        require_finite(out)
        return out
