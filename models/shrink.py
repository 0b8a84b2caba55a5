"""A physically smaller ONNX model: structured pruning's removed units taken out of the file.

A structurally pruned unit is a row of its layer's weight, an entry of its bias and a column
of the next layer's weight (``models.units``), all zero in the trained model. Removing those
slices from the initializers gives the same function with fewer weights: every zoo graph
computes its hidden sizes from the initializers (Gemm, Conv), and its only Reshape uses the
input's constant channel count. The intermediate shapes the exporter recorded
(``value_info``) are dropped and inferred again, and the result must pass the ONNX checker.

onnx + numpy only: the aggregator (which renders it) and a device that serves it alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from fedge.errors import InvalidValue
from models.onnx_weights import parse_model

__all__ = ["shrink_onnx"]

Cuts = Mapping[str, Sequence[tuple[int, Sequence[int]]]]


def shrink_onnx(onnx_bytes: bytes, cuts: Cuts) -> bytes:
    """``onnx_bytes`` without the slices ``cuts`` names (tensor -> ((axis, indices), ...))."""
    model = parse_model(onnx_bytes)
    by_name = {t.name: t for t in model.graph.initializer}
    for name, axes in cuts.items():
        tensor = by_name.get(name)
        if tensor is None:
            raise InvalidValue(f"cut names {name!r}, which the model does not have")
        array = numpy_helper.to_array(tensor)
        for axis, idx in axes:
            if not 0 <= axis < array.ndim or any(not 0 <= i < array.shape[axis] for i in idx):
                raise InvalidValue(f"cut of {name!r} along axis {axis} is out of range")
        # All axes at once against the original indices (axes are distinct per tensor).
        for axis, idx in sorted(axes, key=lambda a: -a[0]):
            array = np.delete(array, list(idx), axis=axis)
        if array.size == 0:
            raise InvalidValue(f"cut removes every weight of {name!r}")
        tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), name=name))
    del model.graph.value_info[:]
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise InvalidValue(f"the pruned model is not valid ONNX: {e}") from None
    return model.SerializeToString(deterministic=True)
