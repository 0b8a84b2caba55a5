"""Measure the activation ranges that int8 quantization needs, on the device's own data.

The aggregator has no data, so it cannot calibrate the int8 model it publishes. Each device
runs a few of its samples through the fp32 global model it received and reports, for every
activation the quantizer needs (`models.int8.calibration_tensor_names`), the min and max it
saw. The aggregator takes the min of the mins and the max of the maxes
(`aggregator.calibration`), which equals what onnxruntime's MinMax calibrator would compute on
the union of the devices' samples, without any sample leaving a device.

How: the intermediate tensors are added as extra graph outputs (what onnxruntime's calibrator
does with ReduceMin/ReduceMax nodes, minus the temporary files), the model runs on at most
`max_samples` samples in batches, and numpy reduces the outputs. onnxruntime, onnx and numpy
only, never torch: an inference-only device can calibrate too. On this project's machine a
64-64-10 MLP with 256 samples takes a few milliseconds.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from models.int8 import calibration_tensor_names, load_fp32_model

__all__ = ["DEFAULT_MAX_SAMPLES", "compute_ranges"]

# The range of a layer's activations settles after a few hundred samples; more only costs
# time on a small device. A device with more data calibrates on a seeded random subset.
DEFAULT_MAX_SAMPLES = 256
_BATCH = 64


def compute_ranges(
    fp32_onnx: bytes,
    x: np.ndarray,
    *,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """{activation name: (min, max)} of `fp32_onnx` run on (up to `max_samples` rows of) `x`.

    `x` is float32 [n, input_dim] with n >= 1 and finite values. Raises ValueError on bad
    input or if the model produces non-finite activations (a diverged model must not
    calibrate the fleet's int8 model).
    """
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    model = load_fp32_model(fp32_onnx)
    graph_inputs = [i.name for i in model.graph.input]
    if len(graph_inputs) != 1:
        raise ValueError(f"expected a model with one input, got {graph_inputs}")
    input_name = graph_inputs[0]
    samples = _select(_check_x(x), max_samples, seed)

    names = calibration_tensor_names(model)
    outputs = [name for name in names if name != input_name]
    existing = {o.name for o in model.graph.output}
    for name in outputs:
        if name not in existing:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    session = _session(model.SerializeToString())

    low = {name: np.inf for name in names}
    high = {name: -np.inf for name in names}
    for start in range(0, len(samples), _BATCH):
        batch = samples[start : start + _BATCH]
        values = dict(zip(outputs, session.run(outputs, {input_name: batch}), strict=True))
        if input_name in low:
            values[input_name] = batch
        for name, value in values.items():
            if value.size == 0:
                continue
            low[name] = min(low[name], float(value.min()))
            high[name] = max(high[name], float(value.max()))
    ranges = {name: (low[name], high[name]) for name in names}
    bad = sorted(
        name for name, (lo, hi) in ranges.items() if not (np.isfinite(lo) and np.isfinite(hi))
    )
    if bad:
        raise ValueError(f"model produced non-finite (or no) activations for {bad[:10]}")
    return ranges


def _check_x(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"x must be a non-empty 2-D array [n, input_dim], got shape {x.shape}")
    if x.dtype.kind != "f":
        raise ValueError(f"x must hold floats, got {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError("x holds non-finite values")
    return x


def _select(x: np.ndarray, max_samples: int, seed: int) -> np.ndarray:
    if len(x) <= max_samples:
        return x
    rows = np.random.default_rng(seed).choice(len(x), size=max_samples, replace=False)
    return x[np.sort(rows)]


def _session(model_bytes: bytes) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    # As onnxruntime's own calibrator: measure the graph as written, not a fused variant.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
