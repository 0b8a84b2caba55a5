"""The reducer of sharded aggregation: merge the workers' partial sums into one FedAvg step.

Sums are associative: ``sum_i n_i delta_i`` over all devices is the sum of the workers'
partial sums, so the merged mean equals the single aggregator's up to the order of float64
additions (and the fp32 rounding of each partial on the wire). Before merging, the reducer
checks that no device is counted by two workers: QoS 1 can redeliver an update to another
worker after a reconnect, and a device may resend. The copy kept is the one of the first
worker in name order; the others are asked for their partial again without that device.

``merge_partials`` and ``Merged`` are plain numpy. ``Reducer`` is the round bookkeeping over
any MQTT session (the aggregator service's own, in production): it publishes requests through
a ``publish(topic, payload)`` callable and is fed the ``{p}/partial/+`` messages by
``handle``. It runs on the mux thread.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedge.errors import AggregationError, ProtocolError
from fedge.limits import DEFAULT_LIMITS, Limits
from fedge.partials import PartialRequest, PartialSum, ShardTopics
from fedge.tensors import TensorSpec
from fedge.topics import validate_device_id

__all__ = ["Merged", "Reducer", "merge_partials", "overlaps"]

log = logging.getLogger(__name__)


@dataclass
class Merged:
    """The round's total over every worker: ``sums`` (float64) and ``total_weight``."""

    round: int
    base_version: int
    sums: dict[str, np.ndarray]
    total_weight: float
    counted: dict[str, str]  # device -> update id, over all workers
    per_worker: dict[str, int]  # updates each worker folded
    uplink_bytes: int = 0
    loss_sum: float = 0.0
    rejected: dict[str, int] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.counted)

    def mean(self) -> dict[str, np.ndarray]:
        """``sum n_i delta_i / sum n_i`` as float32, as ``WeightedSum.mean`` gives it."""
        if self.count == 0:
            raise AggregationError("no updates to average")
        with np.errstate(over="ignore"):
            return {k: (v / self.total_weight).astype(np.float32) for k, v in self.sums.items()}

    def fedavg(
        self, weights: Mapping[str, np.ndarray], server_lr: float = 1.0
    ) -> dict[str, np.ndarray]:
        """``w + server_lr * mean``, the step FedAvg's ``_server_step`` takes (float32)."""
        step, lr = self.mean(), np.float32(server_lr)
        if weights.keys() != step.keys():
            raise AggregationError(f"weights {list(weights)} != partial tensors {list(step)}")
        return {k: np.asarray(w + lr * step[k], np.float32) for k, w in weights.items()}


def overlaps(partials: Sequence[PartialSum]) -> dict[str, list[str]]:
    """Devices counted by more than one partial -> those workers, in name order."""
    by_device: dict[str, list[str]] = {}
    for p in sorted(partials, key=lambda p: p.worker):
        for device in p.counted:
            by_device.setdefault(device, []).append(p.worker)
    return {d: ws for d, ws in by_device.items() if len(ws) > 1}


def merge_partials(partials: Sequence[PartialSum]) -> Merged:
    """The exact sum of sums; ``AggregationError`` if the partials do not belong together."""
    if not partials:
        raise AggregationError("no partial sums to merge")
    first = partials[0]
    workers = [p.worker for p in partials]
    if len(set(workers)) != len(workers):
        raise AggregationError(f"two partials from one worker: {sorted(workers)}")
    for p in partials:
        if (p.round, p.base_version) != (first.round, first.base_version):
            raise AggregationError(
                f"{p.worker}: round {p.round} base v{p.base_version}, "
                f"{first.worker}: round {first.round} base v{first.base_version}"
            )
        if p.sums.keys() != first.sums.keys():
            raise AggregationError(f"{p.worker}: tensors {list(p.sums)} != {list(first.sums)}")
    dup = overlaps(partials)
    if dup:
        raise AggregationError(f"devices counted by two workers: {dup}")
    sums = {k: np.zeros(np.shape(v), np.float64) for k, v in first.sums.items()}
    for p in partials:
        for k, acc in sums.items():
            acc += np.asarray(p.sums[k], np.float64)
    rejected: Counter[str] = Counter()
    for p in partials:
        rejected.update(p.rejected)
    return Merged(
        round=first.round,
        base_version=first.base_version,
        sums=sums,
        total_weight=float(sum(p.total_weight for p in partials)),
        counted={d: u for p in partials for d, u in p.counted.items()},
        per_worker={p.worker: p.count for p in partials},
        uplink_bytes=sum(p.uplink_bytes for p in partials),
        loss_sum=sum(p.loss_sum for p in partials),
        rejected=dict(rejected),
    )


Publish = Callable[[str, bytes], Any]


class Reducer:
    """Collects one partial per worker for the open round, resolves overlaps, merges."""

    def __init__(
        self,
        topics: ShardTopics,
        workers: Sequence[str],
        publish: Publish,
        *,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        if not workers or len(set(workers)) != len(workers):
            raise ValueError(f"workers must be distinct names, got {list(workers)}")
        self.topics = topics
        self.workers = tuple(validate_device_id(w) for w in workers)
        self._publish = publish
        self.limits = limits
        # Request ids grow across rounds and restarts: a late answer is never taken as new.
        self._ids = itertools.count(int(time.time() * 1000))
        self.round = 0
        self.base_version = 0
        self.spec: TensorSpec = {}
        self.overlaps_resolved = 0
        self._want: dict[str, int] = {}
        self._got: dict[str, PartialSum] = {}
        self._on_merged: Callable[[Merged], Any] | None = None

    def begin(
        self,
        round_id: int,
        base_version: int,
        spec: TensorSpec,
        on_merged: Callable[[Merged], Any],
    ) -> None:
        """A new round: forget partials; until ``request``, deadline partials count."""
        self.round, self.base_version, self.spec = round_id, base_version, dict(spec)
        self._want = dict.fromkeys(self.workers, 0)
        self._got = {}
        self._on_merged = on_merged

    def request(self) -> None:
        """Ask every worker for its partial now; ``on_merged`` follows once all answered."""
        self._send(PartialRequest(self.round, next(self._ids)), self.workers)

    def _send(self, req: PartialRequest, workers: Sequence[str]) -> None:
        for w in workers:
            self._want[w] = req.request
            self._got.pop(w, None)
        self._publish(self.topics.request, req.to_bytes())

    def missing(self) -> list[str]:
        """Workers whose partial for the latest request has not come yet."""
        return [w for w in self.workers if w not in self._got]

    def handle(self, topic: str, payload: bytes) -> bool:
        """Take a message from ``{p}/partial/+``; False if the topic is not a partial."""
        worker = self.topics.worker_of(topic)
        if worker is None:
            return False
        if worker not in self._want:
            log.warning("partial from unknown worker %s ignored", worker)
            return True
        try:
            p = PartialSum.from_bytes(payload, self.spec, self.limits)
        except ProtocolError as e:
            log.warning("bad partial from %s: %s", worker, e)
            return True
        if p.worker != worker or (p.round, p.base_version) != (self.round, self.base_version):
            log.info("partial of %s (round %d) is not for round %d", p.worker, p.round, self.round)
            return True
        if p.request < self._want[worker]:
            return True  # answers an older request
        self._got[worker] = p
        if len(self._got) == len(self.workers):
            self._complete()
        return True

    def _complete(self) -> None:
        partials = [self._got[w] for w in self.workers]
        dup = overlaps(partials)
        if dup:
            drops: dict[str, list[str]] = {}
            for device, ws in dup.items():
                for w in ws[1:]:  # the first worker in name order keeps its copy
                    drops.setdefault(w, []).append(device)
            log.warning("round %d: devices counted twice %s: re-asking", self.round, dup)
            self.overlaps_resolved += len(dup)
            for w, devices in sorted(drops.items()):
                self._send(PartialRequest(self.round, next(self._ids), (w,), tuple(devices)), [w])
            return
        if self._on_merged is not None:
            self._on_merged(merge_partials(partials))
