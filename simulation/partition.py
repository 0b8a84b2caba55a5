"""Split a labelled dataset across simulated devices.

Every partitioner returns one sorted ``int64`` index array per device. The
arrays are disjoint and together cover ``range(len(y))`` exactly once, and the
result depends only on the inputs and the random generator (or seed).

Three schemes, named by a :class:`PartitionSpec`:

- ``iid``: a random permutation cut into near-equal parts.
- ``dirichlet:ALPHA``: label skew. For each class, the share each device gets is
  drawn from Dir(ALPHA, ..., ALPHA); small ALPHA gives each device few classes,
  large ALPHA approaches IID (Hsu et al. 2019, "Measuring the effects of
  non-identical data distribution").
- ``shards:K``: the pathological split of McMahan et al. 2017: sort by label,
  cut into ``num_devices * K`` shards and deal K shards to each device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "PartitionSpec",
    "partition",
    "partition_dirichlet",
    "partition_iid",
    "partition_shards",
]

PartitionKind = Literal["iid", "dirichlet", "shards"]

_EXPECTED = "expected iid, dirichlet:ALPHA (ALPHA > 0) or shards:K (K >= 1)"


def format_number(value: float) -> str:
    """Shortest text that parses back to ``value``, without a trailing ``.0``."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


@dataclass(frozen=True)
class PartitionSpec:
    """Which partitioner to use, and its parameter. ``str(spec)`` parses back to ``spec``."""

    kind: PartitionKind
    alpha: float | None = None
    shards: int | None = None

    def __post_init__(self) -> None:
        if self.kind == "iid":
            if self.alpha is not None or self.shards is not None:
                raise ValueError("invalid partition: iid takes no alpha or shards")
        elif self.kind == "dirichlet":
            if self.shards is not None:
                raise ValueError("invalid partition: dirichlet takes alpha, not shards")
            alpha = self.alpha
            if (
                isinstance(alpha, bool)
                or not isinstance(alpha, (int, float))
                or not math.isfinite(alpha)
                or alpha <= 0
            ):
                raise ValueError(
                    f"invalid partition: dirichlet alpha must be a finite number > 0, "
                    f"got {alpha!r}; write e.g. dirichlet:0.5"
                )
            object.__setattr__(self, "alpha", float(alpha))
        elif self.kind == "shards":
            if self.alpha is not None:
                raise ValueError("invalid partition: shards takes shards, not alpha")
            shards = self.shards
            if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
                raise ValueError(
                    f"invalid partition: shards per device must be an integer >= 1, "
                    f"got {shards!r}; write e.g. shards:2"
                )
        else:
            raise ValueError(f"invalid partition kind {self.kind!r}: {_EXPECTED}")

    @classmethod
    def parse(cls, text: str) -> PartitionSpec:
        """Parse ``iid``, ``dirichlet:ALPHA`` or ``shards:K``."""
        kind, sep, arg = text.strip().partition(":")
        kind, arg = kind.strip().lower(), arg.strip()
        try:
            if kind == "iid" and not sep:
                return cls("iid")
            if kind == "dirichlet" and arg:
                return cls("dirichlet", alpha=float(arg))
            if kind == "shards" and arg:
                return cls("shards", shards=int(arg))
        except ValueError:
            pass
        raise ValueError(f"invalid partition {text!r}: {_EXPECTED}")

    def __str__(self) -> str:
        if self.kind == "dirichlet":
            assert self.alpha is not None
            return f"dirichlet:{format_number(self.alpha)}"
        if self.kind == "shards":
            return f"shards:{self.shards}"
        return "iid"


def _check(y: np.ndarray, num_devices: int) -> np.ndarray:
    labels = np.asarray(y)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if isinstance(num_devices, bool) or not isinstance(num_devices, (int, np.integer)):
        raise ValueError(f"num_devices must be an integer, got {num_devices!r}")
    if not 1 <= num_devices <= len(labels):
        raise ValueError(
            f"num_devices must be between 1 and the number of samples ({len(labels)}), "
            f"got {num_devices}"
        )
    return labels


def _finish(parts: list[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(part, dtype=np.int64)) for part in parts]


def partition_iid(y: np.ndarray, num_devices: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle and cut into ``num_devices`` parts whose sizes differ by at most one."""
    labels = _check(y, num_devices)
    return _finish(np.array_split(rng.permutation(len(labels)), num_devices))


def partition_dirichlet(
    y: np.ndarray,
    num_devices: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int | None = None,
    max_attempts: int = 200,
) -> list[np.ndarray]:
    """Label-skewed split: each class is shared out in Dir(alpha) proportions.

    A draw where some device ends up with fewer than ``min_size`` samples is
    thrown away and redrawn, at most ``max_attempts`` times. ``min_size``
    defaults to ``min(2, len(y) // num_devices)``.
    """
    labels = _check(y, num_devices)
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"dirichlet alpha must be a finite number > 0, got {alpha!r}")
    if min_size is None:
        min_size = min(2, len(labels) // num_devices)
    if min_size < 0 or min_size * num_devices > len(labels):
        raise ValueError(
            f"min_size={min_size} cannot hold: {num_devices} devices x {min_size} "
            f"> {len(labels)} samples"
        )
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")

    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(max_attempts):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_devices)]
        for members in by_class:
            shares = rng.dirichlet(np.full(num_devices, alpha))
            # Cumulative cut points; rounding keeps every sample exactly once.
            cuts = np.round(np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for device, chunk in enumerate(np.split(rng.permutation(members), cuts)):
                parts[device].append(chunk)
        merged = [np.concatenate(chunks) for chunks in parts]
        if min(len(part) for part in merged) >= min_size:
            return _finish(merged)
    raise ValueError(
        f"dirichlet:{format_number(alpha)} gave some device fewer than {min_size} samples "
        f"in {max_attempts} attempts ({len(labels)} samples, {num_devices} devices); "
        f"use a larger alpha, fewer devices or a smaller min_size"
    )


def partition_shards(
    y: np.ndarray, num_devices: int, shards_per_device: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Sort by label, cut into ``num_devices * shards_per_device`` shards, deal them at random.

    Shards differ in size by at most one sample. When every class size is a
    multiple of the shard size, each shard holds one label and each device at
    most ``shards_per_device`` labels.
    """
    labels = _check(y, num_devices)
    if isinstance(shards_per_device, bool) or shards_per_device < 1:
        raise ValueError(f"shards_per_device must be >= 1, got {shards_per_device!r}")
    num_shards = num_devices * shards_per_device
    if num_shards > len(labels):
        raise ValueError(
            f"{num_devices} devices x {shards_per_device} shards = {num_shards} shards "
            f"> {len(labels)} samples; use fewer devices or shards"
        )
    # Shuffle before the stable sort so a shard is a random sample of its class.
    shuffled = rng.permutation(len(labels))
    order = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(order, num_shards)
    dealt = rng.permutation(num_shards).reshape(num_devices, shards_per_device)
    return _finish([np.concatenate([shards[s] for s in row]) for row in dealt])


def partition(
    y: np.ndarray, num_devices: int, spec: PartitionSpec | str, seed: int
) -> list[np.ndarray]:
    """Split ``y``'s indices across ``num_devices`` as ``spec`` says, reproducibly for ``seed``."""
    if isinstance(spec, str):
        spec = PartitionSpec.parse(spec)
    rng = np.random.default_rng(seed)
    if spec.kind == "dirichlet":
        assert spec.alpha is not None
        return partition_dirichlet(y, num_devices, spec.alpha, rng)
    if spec.kind == "shards":
        assert spec.shards is not None
        return partition_shards(y, num_devices, spec.shards, rng)
    return partition_iid(y, num_devices, rng)
