"""The Synthetic(alpha, beta) federated dataset of FedProx (Li et al., MLSys 2020).

Each device k owns a softmax-regression task of its own:

- u_k ~ N(0, alpha); W_k in R^{10x60} and b_k in R^10 have entries ~ N(u_k, 1).
  ``alpha`` controls how much the local models differ.
- B_k ~ N(0, beta); v_k in R^60 has entries ~ N(B_k, 1).
  ``beta`` controls how much the local inputs differ.
- x ~ N(v_k, Sigma) with Sigma diagonal, Sigma_jj = j^-1.2 (j = 1..60).
- y = argmax(softmax(W_k x + b_k)), i.e. argmax of the logits.

As in the authors' generator (``litian96/FedProx``, ``data/synthetic_*``), the
second argument of N(., alpha) and N(., beta) is used as the standard deviation.

Synthetic(0, 0) is the paper's "synthetic IID": one W, b ~ N(0, 1) shared by all
devices and v = 0 for all devices, so every device samples the same
distribution.

Device sizes follow the paper: ``floor(lognormal(4, 2)) + 50`` samples, which has
a very heavy tail (the 99th percentile is near 6,000), so we cap it at
:data:`MAX_SAMPLES` to keep simulated devices small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "INPUT_DIM",
    "MAX_SAMPLES",
    "MIN_SAMPLES",
    "NUM_CLASSES",
    "SyntheticTask",
    "make_synthetic",
    "synthetic_tasks",
]

INPUT_DIM = 60
NUM_CLASSES = 10
MIN_SAMPLES = 50
MAX_SAMPLES = 2000

_SIGMA_DIAG = np.arange(1, INPUT_DIM + 1, dtype=np.float64) ** -1.2


def _check_scale(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _device_size(rng: np.random.Generator) -> int:
    return min(int(rng.lognormal(4.0, 2.0)) + MIN_SAMPLES, MAX_SAMPLES)


@dataclass(frozen=True, eq=False)
class SyntheticTask:
    """Device k's ground truth: logits ``w @ x + b`` over inputs centred on ``v``."""

    w: np.ndarray  # [10, 60]
    b: np.ndarray  # [10]
    v: np.ndarray  # [60]
    size: int

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        x = self.v + np.sqrt(_SIGMA_DIAG) * rng.standard_normal((self.size, INPUT_DIM))
        y = np.argmax(x @ self.w.T + self.b, axis=1)
        return x.astype(np.float32), y.astype(np.int64)


def _check_devices(num_devices: int) -> None:
    if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1:
        raise ValueError(f"num_devices must be an integer >= 1, got {num_devices!r}")


# Independent streams, each named by a spawn key, so that device k's data does not
# depend on num_devices and its parameters do not depend on how it is sampled.
_SHARED, _PARAMS, _SAMPLES = 0, 1, 2


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def synthetic_tasks(num_devices: int, alpha: float, beta: float, seed: int) -> list[SyntheticTask]:
    """The per-device parameters (W_k, b_k, v_k, n_k) behind :func:`make_synthetic`."""
    _check_devices(num_devices)
    alpha = _check_scale("alpha", alpha)
    beta = _check_scale("beta", beta)
    shared = _rng(seed, _SHARED)
    shared_w = shared.normal(0.0, 1.0, (NUM_CLASSES, INPUT_DIM))
    shared_b = shared.normal(0.0, 1.0, NUM_CLASSES)
    iid = alpha == 0 and beta == 0

    tasks = []
    for k in range(num_devices):
        rng = _rng(seed, _PARAMS, k)
        size = _device_size(rng)
        if iid:
            tasks.append(SyntheticTask(shared_w, shared_b, np.zeros(INPUT_DIM), size))
            continue
        u = rng.normal(0.0, alpha)
        w = rng.normal(u, 1.0, (NUM_CLASSES, INPUT_DIM))
        b = rng.normal(u, 1.0, NUM_CLASSES)
        v = rng.normal(rng.normal(0.0, beta), 1.0, INPUT_DIM)
        tasks.append(SyntheticTask(w, b, v, size))
    return tasks


def make_synthetic(
    num_devices: int, alpha: float, beta: float, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """One ``(x float32 [n, 60], y int64 [n])`` pair per device.

    Device k's data depends only on ``(alpha, beta, seed, k)``, not on
    ``num_devices``: growing the fleet adds devices without changing the others.
    """
    tasks = synthetic_tasks(num_devices, alpha, beta, seed)
    return [task.sample(_rng(seed, _SAMPLES, k)) for k, task in enumerate(tasks)]
