"""Local differential privacy: the device clips its delta and adds Gaussian noise itself.

Nothing that leaves the device is then more than a Gaussian mechanism of its data, whoever
reads it (broker, aggregator, anyone holding a published model). The price is noise on every
update instead of once on the sum: for the same epsilon, about sqrt(devices per round) times
more noise in the average than central DP (``aggregator.strategies.dp_fedavg``).

Apply it to the delta *before* the codec: quantizing or sparsifying noisy values is
post-processing and costs no privacy; a top-k error-feedback residual must be computed from
the privatized delta, never the raw one, or raw information leaks into later rounds.

Accounting: any two datasets of a device can give clipped deltas up to ``2 C`` apart (both
anywhere in the ball of radius ``C``), so one release with noise ``z * C`` is a Gaussian
mechanism with noise multiplier ``z / 2``; the device's releases over ``rounds`` rounds
compose. ``dp-accounting`` is needed only for ``local_epsilon`` / ``local_noise_multiplier``,
and is imported only there, so a device that just applies a given ``z`` does not need it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedge.clipping import clip_update, l2_norm

__all__ = ["LocalDP", "clip_update", "l2_norm", "local_epsilon", "local_noise_multiplier"]


@dataclass(frozen=True)
class LocalDP:
    """Clip to ``clip_norm``, then add N(0, (noise_multiplier * clip_norm)^2) per coordinate."""

    clip_norm: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        if not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {self.clip_norm}")
        if not self.noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.clip_norm

    def privatize(
        self, delta: Mapping[str, np.ndarray], rng: np.random.Generator | None = None
    ) -> dict[str, np.ndarray]:
        """The delta to send: clipped, noised, in each tensor's own dtype (float32 models)."""
        rng = rng if rng is not None else np.random.default_rng()  # OS entropy
        clipped, _ = clip_update(delta, self.clip_norm)
        out = {}
        for k, v in clipped.items():
            noisy = v + rng.normal(0.0, self.noise_std, size=v.shape) if self.noise_std else v
            out[k] = noisy.astype(np.asarray(delta[k]).dtype, copy=False)
        return out

    def epsilon(self, rounds: int, delta: float = 1e-5) -> float:
        """Epsilon of this device's data after it took part in ``rounds`` rounds."""
        return local_epsilon(self.noise_multiplier, rounds, delta)


def local_epsilon(noise_multiplier: float, rounds: int, delta: float = 1e-5) -> float:
    """RDP epsilon at ``delta`` of ``rounds`` local releases with noise ``z * C``."""
    if rounds < 0 or not 0.0 < delta < 1.0:
        raise ValueError("need rounds >= 0 and delta in (0, 1)")
    if rounds == 0:
        return 0.0
    if not noise_multiplier > 0:
        return math.inf
    import dp_accounting as dpa
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant()
    acc.compose(dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(noise_multiplier / 2.0), rounds))
    return float(acc.get_epsilon(delta))


def local_noise_multiplier(target_epsilon: float, rounds: int, delta: float = 1e-5) -> float:
    """The smallest ``z`` (within 1e-4) with ``local_epsilon(z, rounds, delta) <= target``."""
    if not target_epsilon > 0 or rounds < 1 or not 0.0 < delta < 1.0:
        raise ValueError("need target_epsilon > 0, rounds >= 1 and delta in (0, 1)")
    import dp_accounting as dpa
    from dp_accounting.rdp import RdpAccountant

    half = dpa.calibrate_dp_mechanism(
        RdpAccountant,
        lambda s: dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(s), rounds),
        target_epsilon,
        delta,
        dpa.LowerEndpointAndGuess(1e-3, 1.0),
        tol=5e-5,
    )
    return 2.0 * float(half)
