"""Central evaluation of a published version, run on the exact ONNX bytes devices receive."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from fedge.errors import ConfigError

__all__ = ["EvalSet", "evaluate_onnx"]


@dataclass(frozen=True)
class EvalSet:
    x: np.ndarray
    y: np.ndarray

    @classmethod
    def from_npz(cls, path: Path, input_dim: int | None = None) -> EvalSet:
        """Read ``x``, ``y``; with ``input_dim``, refuse an ``x`` of another width at start
        (onnxruntime would refuse it at the first evaluation, as a traceback)."""
        try:
            with np.load(path, allow_pickle=False) as z:
                x, y = z["x"].astype(np.float32), z["y"].astype(np.int64)
        except (OSError, KeyError, ValueError) as e:
            raise ConfigError(f"eval_data {path}: {e}; expected an .npz with x and y") from None
        if x.ndim != 2 or y.shape != (len(x),):
            raise ConfigError(
                f"eval_data {path}: expected x[n, features] and y[n], got {x.shape}, {y.shape}"
            )
        if input_dim is not None and x.shape[1] != input_dim:
            raise ConfigError(
                f"eval_data {path} has {x.shape[1]} features, the model expects {input_dim} "
                "(model.input_dim)"
            )
        return cls(x, y)


def evaluate_onnx(onnx: bytes, data: EvalSet) -> dict[str, float]:
    """Accuracy and mean cross-entropy of the model's logits on ``data``."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(onnx, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    logits = sess.run(None, {name: data.x})[0].astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = float(-logp[np.arange(len(data.y)), data.y].mean())
    acc = float((logits.argmax(axis=1) == data.y).mean())
    return {"accuracy": acc, "loss": loss}
