"""Central differential privacy: DP-FedAvg (McMahan et al., ICLR 2018) with an accountant.

Each round the aggregator clips every device's delta to L2 norm ``C``, sums the clipped deltas
with **equal weight** (a device's ``num_samples`` must not scale its influence, or the
sensitivity is unbounded), adds Gaussian noise of standard deviation ``z * C`` to the sum, and
divides by the expected number of devices per round. Adding or removing one device changes the
sum by at most ``C``, so each round is a Gaussian mechanism with noise multiplier ``z`` and the
rounds compose; ``dp-accounting`` (Google's accountant library) turns ``(z, q, rounds)`` into
``(epsilon, delta)``, and finds ``z`` for a target epsilon before training starts.

This is device-level (user-level) DP of the *published models* against everyone but the
aggregator, which sees raw updates: trust in the aggregator is the premise of central DP (local
DP, ``edge_agent.privacy``, drops it at a large accuracy cost).

``q`` is the probability that a device takes part in a round. Amplification by sampling holds
only for a real Poisson sample chosen by the aggregator; a round that closes at the first
``target_devices`` to answer is not one, so keep ``q = 1`` unless the selection is random.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np

from aggregator.strategies.base import StateDict, Strategy
from aggregator.strategies.options import StrategyOptions, opt
from fedge.clipping import clip_update, l2_norm
from fedge.errors import AggregationError, InvalidValue
from fedge.tensors import TensorSpec

__all__ = [
    "ACCOUNTANTS",
    "DPFedAvg",
    "DPFedAvgOptions",
    "NoisyClippedSum",
    "clip_update",
    "epsilon_spent",
    "l2_norm",
    "noise_multiplier_for",
]

ACCOUNTANTS = ("rdp", "pld")


def _check(delta: float, sampling_rate: float, accountant: str) -> None:
    if not 0.0 < delta < 1.0:
        raise InvalidValue(f"delta must be in (0, 1), got {delta}")
    if not 0.0 < sampling_rate <= 1.0:
        raise InvalidValue(f"sampling_rate must be in (0, 1], got {sampling_rate}")
    if accountant not in ACCOUNTANTS:
        raise InvalidValue(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def _event(noise_multiplier: float, sampling_rate: float, rounds: int):  # type: ignore[no-untyped-def]
    import dp_accounting as dpa

    one = dpa.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1.0:
        one = dpa.PoissonSampledDpEvent(sampling_rate, one)
    return dpa.SelfComposedDpEvent(one, rounds)


def _accountant(kind: str):  # type: ignore[no-untyped-def]
    if kind == "pld":
        from dp_accounting.pld import PLDAccountant

        return PLDAccountant()
    from dp_accounting.rdp import RdpAccountant

    return RdpAccountant()


@lru_cache(maxsize=4096)
def epsilon_spent(
    noise_multiplier: float,
    rounds: int,
    delta: float,
    sampling_rate: float = 1.0,
    accountant: str = "rdp",
) -> float:
    """Epsilon at ``delta`` after ``rounds`` rounds (0.0 for none, inf without noise)."""
    _check(delta, sampling_rate, accountant)
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if rounds == 0:
        return 0.0
    if not noise_multiplier > 0:
        return math.inf
    acc = _accountant(accountant)
    acc.compose(_event(noise_multiplier, sampling_rate, rounds))
    return float(acc.get_epsilon(delta))


def noise_multiplier_for(
    target_epsilon: float, delta: float, rounds: int, sampling_rate: float = 1.0
) -> float:
    """The smallest ``z`` (within 1e-4) whose RDP epsilon after ``rounds`` is <= the target.

    Calibrated with the RDP accountant (milliseconds; PLD takes minutes here). RDP bounds
    epsilon from above, so the PLD epsilon of the result is at most the target as well.
    """
    import dp_accounting as dpa

    _check(delta, sampling_rate, "rdp")
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    z = dpa.calibrate_dp_mechanism(
        lambda: _accountant("rdp"),
        lambda z: _event(z, sampling_rate, rounds),
        target_epsilon,
        delta,
        dpa.LowerEndpointAndGuess(1e-3, 1.0),
        tol=1e-4,
    )
    return float(z)


# -- clipping --------------------------------------------------------------------------------


class NoisyClippedSum:
    """Streaming sum of clipped deltas (memory O(model)) with Gaussian noise at release."""

    def __init__(self, spec: TensorSpec, clip_norm: float) -> None:
        if not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
        self.clip_norm = float(clip_norm)
        self.sums = {k: np.zeros(s, dtype=np.float64) for k, s in spec.items()}
        self.count = 0
        self.clipped = 0

    def add(self, delta: Mapping[str, np.ndarray]) -> float:
        """Clip and add one update; returns its norm before clipping."""
        if set(delta) != set(self.sums):
            raise AggregationError("update tensors do not match the model")
        clipped, norm = clip_update(delta, self.clip_norm)
        for k, acc in self.sums.items():
            acc += clipped[k]
        self.count += 1
        self.clipped += norm > self.clip_norm
        return norm

    def release(self, noise_std: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """The sum plus independent N(0, noise_std^2) on every coordinate (float64)."""
        return {
            k: v + rng.normal(0.0, noise_std, size=v.shape) if noise_std > 0 else v.copy()
            for k, v in self.sums.items()
        }


@dataclasses.dataclass(frozen=True)
class DPFedAvgOptions(StrategyOptions):
    clip_norm: float = opt(1.0, "L2 bound of each device's update: the DP sensitivity (> 0)")
    noise_multiplier: float = opt(1.0, "noise std on the sum / clip_norm (if no target_epsilon)")
    target_epsilon: float = opt(0.0, "epsilon after `rounds` rounds; sets noise_multiplier")
    delta: float = opt(1e-5, "the delta of (epsilon, delta)-DP; well below 1/devices")
    rounds: int = opt(0, "rounds planned: the budget, no model past it (0 = no limit)")
    sampling_rate: float = opt(1.0, "probability a device is in a round (Poisson sampling)")
    expected_devices: int = opt(10, "denominator of the mean: set to target_devices")
    accountant: str = opt("rdp", "accountant reporting epsilon: rdp or pld (slower, tighter)")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.delta, self.sampling_rate, self.accountant)
        if not self.clip_norm > 0:
            raise InvalidValue(f"clip_norm must be > 0 for DP, got {self.clip_norm}")
        if self.noise_multiplier < 0 or self.target_epsilon < 0 or self.rounds < 0:
            raise InvalidValue("noise_multiplier, target_epsilon and rounds must be >= 0")
        if self.target_epsilon > 0 and self.rounds == 0:
            raise InvalidValue("target_epsilon needs rounds > 0 (the rounds it must last)")
        if self.target_epsilon == 0 and self.noise_multiplier == 0:
            raise InvalidValue("noise_multiplier 0 gives no privacy; set it or target_epsilon")
        if self.expected_devices < 1:
            raise InvalidValue(f"expected_devices must be >= 1, got {self.expected_devices}")


class DPFedAvg(Strategy):
    """The mean of clipped, equally weighted deltas with Gaussian noise on their sum, then the
    plain server step (``server_lr``).

    ``expected_devices`` is the fixed denominator of the mean (the round's ``target_devices``):
    dividing by the count that actually arrived would make the count part of the release. The
    rounds released so far are in ``state_dict`` (``dp_rounds``), so the accountant resumes
    after a restart. With ``rounds`` set, ``finish`` refuses to release a round past it
    (``AggregationError``), because epsilon would exceed what was promised.
    """

    name = "dp-fedavg"
    summary = "DP-FedAvg: clipped, equally weighted mean + Gaussian noise (McMahan et al. 2018)"

    @classmethod
    def round_defaults(cls, target_devices: int) -> dict[str, str]:
        # The mean's fixed denominator is the round's target unless set explicitly.
        return {"expected_devices": str(target_devices)}

    Options = DPFedAvgOptions
    options: DPFedAvgOptions

    def __init__(
        self, options: DPFedAvgOptions | None = None, rng: np.random.Generator | None = None
    ) -> None:
        super().__init__(options)
        o = self.options
        self.noise_multiplier = (
            noise_multiplier_for(o.target_epsilon, o.delta, o.rounds, o.sampling_rate)
            if o.target_epsilon > 0
            else o.noise_multiplier
        )
        self.rounds_done = 0
        # Seeded from the OS: the noise must be unpredictable to whoever sees the model.
        self.rng = rng if rng is not None else np.random.default_rng()
        self._sum: NoisyClippedSum | None = None
        self._last_clipped = 0
        # Secure rounds: the sum's sensitivity once quantization is counted (>= clip_norm).
        self._sensitivity = float(self.options.clip_norm)

    @property
    def epsilon(self) -> float:
        """Epsilon spent by the rounds released so far."""
        o = self.options
        return epsilon_spent(
            self.noise_multiplier, self.rounds_done, o.delta, o.sampling_rate, o.accountant
        )

    @property
    def exhausted(self) -> bool:
        return 0 < self.options.rounds <= self.rounds_done

    def _begin(self, spec: dict[str, tuple[int, ...]]) -> None:
        self._sum = NoisyClippedSum(spec, self.options.clip_norm)
        self._sensitivity = float(self.options.clip_norm)

    def fold_clipped_sum(
        self, sums: Mapping[str, np.ndarray], count: int, sensitivity: float
    ) -> None:
        """Take the round's sum of ``count`` updates each clipped by its device (secure
        aggregation: the aggregator sees only the sum). ``sensitivity`` bounds one update's
        L2 norm as it reached the sum (clip_norm plus what quantization may add); the noise
        is scaled to it, so epsilon stays what the accountant reports."""
        self._require_round("fold_clipped_sum")
        assert self._sum is not None
        if set(sums) != set(self._sum.sums) or not count > 0:
            raise AggregationError("the secure sum does not match the model, or is empty")
        for k, acc in self._sum.sums.items():
            acc += np.asarray(sums[k], np.float64)
        self._sum.count += int(count)
        self._sensitivity = max(self._sensitivity, float(sensitivity))

    def _fold(self, delta: Mapping[str, np.ndarray], weight: float, scale: float) -> None:
        # ``weight`` (num_samples) is ignored on purpose: it would scale the sensitivity.
        # ``scale`` holds the base class's clipping and staleness discount; the sum clips
        # again, so a staleness weight above 1 cannot lift an update past clip_norm.
        assert self._sum is not None
        try:
            self._sum.add({k: np.asarray(v, np.float64) * scale for k, v in delta.items()})
        except ValueError as e:
            raise AggregationError(str(e)) from None

    @property
    def count(self) -> int:
        return 0 if self._sum is None else self._sum.count

    def _aggregate(self) -> Mapping[str, np.ndarray]:
        assert self._sum is not None
        if self.exhausted:
            raise AggregationError(
                f"privacy budget spent: {self.rounds_done} of {self.options.rounds} rounds "
                f"released (epsilon {self.epsilon:.3g}); no further model is published"
            )
        noisy = self._sum.release(self.noise_multiplier * self._sensitivity, self.rng)
        # Counted before the caller knows whether the model is usable: over-counting a round
        # that is then dropped only makes the reported epsilon conservative.
        self.rounds_done += 1
        self._last_clipped = self._sum.clipped
        n = float(self.options.expected_devices)
        return {k: (v / n).astype(np.float32) for k, v in noisy.items()}

    def round_metrics(self) -> dict[str, float]:
        """For the metrics line of the round just finished (and the run summary)."""
        return {
            "dp_epsilon": self.epsilon,
            "dp_delta": self.options.delta,
            "dp_noise_multiplier": self.noise_multiplier,
            "dp_clip_norm": self.options.clip_norm,
            "dp_sensitivity": self._sensitivity,
            "dp_clipped": float(self._last_clipped),
            "dp_rounds": float(self.rounds_done),
        }

    def state_dict(self) -> StateDict:
        return {**super().state_dict(), "dp_rounds": self.rounds_done}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        rounds = d.get("dp_rounds")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise ValueError(f"{self.name} state: dp_rounds must be an int >= 0, got {rounds!r}")
        super().load_state_dict(d)
        self.rounds_done = rounds
