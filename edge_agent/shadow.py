"""Shadow evaluation: a release candidate and the serving model on the device's labelled
hold-out, side by side, with onnxruntime only (torch-free, like ``edge_agent.inference``).

Accuracy and mean cross-entropy over the whole hold-out (one batch), and latency as the mean
wall time of batch-1 predictions over the first ``LATENCY_SAMPLES`` samples: what a device
answering one request at a time sees.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from edge_agent.inference import OnnxPredictor

__all__ = ["LATENCY_SAMPLES", "Scores", "score"]

LATENCY_SAMPLES = 32


@dataclass(frozen=True)
class Scores:
    accuracy: float
    loss: float
    latency_ms: float
    samples: int


def score(onnx: bytes, x: np.ndarray, y: np.ndarray) -> Scores:
    """Scores of ``onnx`` on ``(x, y)``; ``ValueError`` if the model cannot be loaded or run
    on inputs of this width (a load error the rollout counts as a failure)."""
    predictor = OnnxPredictor(onnx)
    logits = predictor.predict_logits(x).astype(np.float64)
    if logits.ndim != 2 or logits.shape[0] != len(y) or not np.isfinite(logits).all():
        raise ValueError(f"model gave logits of shape {logits.shape} (finite: no)")
    if int(y.max(initial=0)) >= logits.shape[1]:
        raise ValueError(f"labels up to {int(y.max())} but the model has {logits.shape[1]} classes")
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = float(-log_probs[np.arange(len(y)), y].mean()) if len(y) else 0.0
    accuracy = float((logits.argmax(axis=1) == y).mean()) if len(y) else 0.0
    n = min(LATENCY_SAMPLES, len(x))
    start = time.perf_counter()
    for i in range(n):
        predictor.predict_logits(x[i : i + 1])
    latency_ms = 1000.0 * (time.perf_counter() - start) / max(1, n)
    return Scores(accuracy, min(loss, 1e9), latency_ms, len(y))
