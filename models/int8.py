"""int8 ONNX from an fp32 ONNX and activation ranges, without a central calibration set.

onnxruntime's static quantizer needs, for every activation it quantizes, the range [min, max]
the tensor takes on real data. `quantize_static` gets those by running a calibration data
reader through the model; fedge has no central data, so devices measure the ranges on their
own samples (`edge_agent.calibration`), the aggregator merges them
(`aggregator.calibration`), and `quantize_int8` hands the merged ranges straight to
onnxruntime's `QDQQuantizer` as the `TensorsData` a MinMax calibrator would have produced.
That is exactly the step `quantize_static` runs after calibration; calling it directly keeps
everything in memory (no temporary files, no calibration cache on disk).

The int8 model: QDQ format (QuantizeLinear/DequantizeLinear pairs that onnxruntime fuses into
integer kernels), weights int8 symmetric per output channel, activations uint8 affine per
tensor (int8 on request), biases int32. The weights use 7 bits ([-64, 64], onnxruntime's
`reduce_range`) so that no CPU kernel can saturate (see `_WEIGHT_QMAX`). `models.qat`
fake-quantizes on the same grid.
One self-contained file; the same inputs give the same bytes.

Imports onnx, onnxruntime and numpy only (never torch), so devices can use
`calibration_tensor_names` to know what to measure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import QuantType
from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
from onnxruntime.quantization.quant_utils import add_infer_metadata, update_opset_version
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

from models.onnx_weights import parse_model

__all__ = [
    "ActivationType",
    "MissingRanges",
    "calibration_tensor_names",
    "load_fp32_model",
    "quantize_int8",
]

ActivationType = Literal["uint8", "int8"]

# What quantize_static quantizes by default; the calibrator selects tensors by the same list.
_OP_TYPES = tuple(sorted(set(QDQRegistry) | set(QLinearOpsRegistry)))
_QUANT_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearMatMul", "QGemm"})
_ACTIVATION_TYPES: dict[str, QuantType] = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
# Weights are int8 on [-_WEIGHT_QMAX, _WEIGHT_QMAX] = [-64, 64] (onnxruntime's reduce_range),
# not [-127, 127]. onnxruntime's x86 u8 x s8 kernels without VNNI (AVX2, AVX-512 without VNNI:
# e.g. AMD EPYC before Zen 4) multiply with VPMADDUBSW, which adds pairs of uint8 x int8 products
# in int16 and saturates at 32767: with 8-bit weights 255 * 127 * 2 = 64770 overflows, and on
# the digits mlp the int8 logits moved by up to 4.5 (~17 steps of the logits grid) against the
# QDQ graph's own arithmetic, on 359 of 360 test samples. int8 activations do not avoid it (on
# x86 onnxruntime rewrites them to uint8 before the kernel). With |w| <= 64, 255 * 64 * 2 =
# 32640 fits, so every CPU computes exactly what the QDQ graph (and models.qat) says.
_WEIGHT_QMAX = 64
# Set by add_infer_metadata so the quantizer trusts our in-memory shape inference instead of
# redoing it through temporary files; removed from the published model.
_INFER_KEY = "onnx.infer"


class MissingRanges(ValueError):
    """Some activation the quantizer needs has no range (e.g. no device reported one)."""


def load_fp32_model(fp32_onnx: bytes) -> onnx.ModelProto:
    """Parse a single-file fp32 model and run shape inference (to know every tensor's type).

    Refuses bytes that are not a model, models with external data and already-quantized models.
    """
    model = parse_model(fp32_onnx)
    quantized = sorted({n.op_type for n in model.graph.node} & _QUANT_OPS)
    if quantized:
        raise ValueError(f"model is already quantized (has {quantized}); pass the fp32 model")
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except onnx.shape_inference.InferenceError as exc:
        raise ValueError(f"ONNX shape inference failed: {exc}") from None


def calibration_tensor_names(model: bytes | onnx.ModelProto) -> tuple[str, ...]:
    """The activations that need a range: float inputs and outputs of quantizable nodes.

    Same selection as onnxruntime's calibrators (`select_tensors_to_calibrate` with the
    quantizer's default op types), sorted. For the zoo's `mlp`: the graph input, each Gemm
    and Relu output, and the logits.
    """
    if isinstance(model, bytes | bytearray):
        model = load_fp32_model(bytes(model))
    graph = model.graph
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    typed = {
        vi.name: vi.type.tensor_type.elem_type
        for vi in (*graph.value_info, *graph.output, *graph.input)
        if vi.type.HasField("tensor_type")
    }
    initializers = {t.name for t in graph.initializer}
    names = {
        name
        for node in graph.node
        if node.op_type in _OP_TYPES
        for name in (*node.input, *node.output)
        if typed.get(name) in float_types and name not in initializers
    }
    return tuple(sorted(names))


def quantize_int8(
    fp32_onnx: bytes,
    ranges: Mapping[str, Sequence[float]],
    *,
    activation_type: ActivationType = "uint8",
) -> bytes:
    """A QDQ int8 model of `fp32_onnx`, calibrated with `ranges` (name -> (min, max)).

    `ranges` must cover every name of `calibration_tensor_names(fp32_onnx)` (else
    `MissingRanges`) and name nothing else; each range must be finite with min <= max.
    """
    if activation_type not in _ACTIVATION_TYPES:
        raise ValueError(f"activation_type must be one of {sorted(_ACTIVATION_TYPES)}")
    model = load_fp32_model(fp32_onnx)
    needed = calibration_tensor_names(model)
    unknown = sorted(set(ranges) - set(needed))
    if unknown:
        raise ValueError(f"ranges name tensors the model does not calibrate: {unknown[:10]}")
    missing = [name for name in needed if name not in ranges]
    if missing:
        raise MissingRanges(f"no range for activation(s) {missing[:10]} ({len(missing)} missing)")
    # A fresh TensorsData per call: the quantizer rewrites entries in place (Relu inputs take
    # their output's range).
    data = {name: _tensor_data(name, ranges[name]) for name in needed}
    # As quantize_static: QDQ with per-channel scales needs opset >= 13 (a no-op for ours, 17).
    model = update_opset_version(model, QuantType.QInt8, _ACTIVATION_TYPES[activation_type])
    add_infer_metadata(model)
    quantizer = QDQQuantizer(
        model,
        True,  # per_channel: one weight scale per output channel, as models.qat rounds
        # reduce_range: weights on [-64, 64] (activations keep all 8 bits; onnxruntime applies
        # reduce_range to weights only). Not optional: see _WEIGHT_QMAX.
        True,
        QuantType.QInt8,
        _ACTIVATION_TYPES[activation_type],
        TensorsData(CalibrationMethod.MinMax, data),
        [],  # nodes_to_quantize: all
        [],  # nodes_to_exclude: none
        list(_OP_TYPES),
        # The grid models.qat trains on, spelled out rather than left to the quantizer's
        # defaults: symmetric weights (per-channel forces it anyway), affine activations with
        # the zero point where the range puts it.
        {
            "WeightSymmetric": True,
            "ActivationSymmetric": False,
            "ActivationRestrictedAsymmetric": False,
        },
    )
    quantizer.quantize_model()
    # The quantizer appends Q/DQ nodes at the end; onnxruntime runs that, but the ONNX spec
    # (and onnx.checker) wants nodes in topological order. The sort is deterministic.
    quantizer.model.topological_sort()
    quantized: onnx.ModelProto = quantizer.model.model
    _check_weight_range(quantized)
    props = [p for p in quantized.metadata_props if p.key != _INFER_KEY]
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(props)
    onnx.checker.check_model(quantized)
    return quantized.SerializeToString(deterministic=True)


def _check_weight_range(model: onnx.ModelProto) -> None:
    """Refuse to publish int8 weights beyond [-64, 64]: some CPU would saturate on them."""
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.INT8 and init.name.endswith("_quantized"):
            q = numpy_helper.to_array(init)
            if q.size and int(np.abs(q.astype(np.int16)).max()) > _WEIGHT_QMAX:
                raise RuntimeError(
                    f"onnxruntime quantized {init.name} beyond [-{_WEIGHT_QMAX}, {_WEIGHT_QMAX}]"
                    " (reduce_range ignored?): x86 kernels without VNNI would saturate"
                )


def _tensor_data(name: str, value: Sequence[float]) -> TensorData:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"range of {name!r} must be two numbers (min, max)") from None
    # Checked as float32, the type the quantizer computes in: 1e39 is finite only in float64.
    with np.errstate(over="ignore"):
        low32, high32 = np.float32(low), np.float32(high)
    if not (np.isfinite(low32) and np.isfinite(high32)) or low32 > high32:
        raise ValueError(f"range of {name!r} must be finite float32 with min <= max, got {value!r}")
    return TensorData(lowest=low32, highest=high32)
