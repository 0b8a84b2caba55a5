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
``handle``. It keeps each worker's newest partial of the round, so a worker slower than the
polling still contributes (an answer to an older request is still news), and merges whenever
every worker has one. A ``final`` request seals the round: only answers to it (or later)
count from then on, and their merge is ``Merged.final``: the sums to close the round on.
Partials made under another ``ShardPolicy`` than the reducer's are refused, with the
difference in the log. It runs on the mux thread.
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

from aggregator.sharded.partials import PartialRequest, PartialSum, ShardPolicy, ShardTopics
from fedge.errors import AggregationError, ProtocolError
from fedge.limits import DEFAULT_LIMITS, Limits
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
    final: bool = False  # every partial answered the sealing request
    left_out: tuple[str, ...] = ()  # workers the round goes on without (sites cut off)

    @property
    def count(self) -> int:
        return len(self.counted)

    @property
    def dense(self) -> bool:
        """False when a partial was a summary (counts only): nothing to close the round on."""
        return bool(self.sums)

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
    dense = all(p.dense for p in partials)
    for p in partials:
        if dense and p.sums.keys() != first.sums.keys():
            raise AggregationError(f"{p.worker}: tensors {list(p.sums)} != {list(first.sums)}")
    dup = overlaps(partials)
    if dup:
        raise AggregationError(f"devices counted by two workers: {dup}")
    # A summary among them (a gateway's answer before the seal): counts only, no sums.
    sums = {k: np.zeros(np.shape(v), np.float64) for k, v in first.sums.items()} if dense else {}
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
    """Collects each worker's newest partial for the open round, resolves overlaps, merges."""

    def __init__(
        self,
        topics: ShardTopics,
        workers: Sequence[str],
        publish: Publish,
        *,
        limits: Limits = DEFAULT_LIMITS,
        policy: ShardPolicy | None = None,
    ) -> None:
        if not workers or len(set(workers)) != len(workers):
            raise ValueError(f"workers must be distinct names, got {list(workers)}")
        self.topics = topics
        self.workers = tuple(validate_device_id(w) for w in workers)
        self._publish = publish
        self.limits = limits
        self.policy = policy  # None: take partials made under any policy
        # Request ids grow across rounds and restarts: a late answer is never taken as new.
        self._ids = itertools.count(int(time.time() * 1000))
        self.round = 0
        self.base_version = 0
        self.spec: TensorSpec = {}
        self.overlaps_resolved = 0
        self.refused: dict[str, str] = {}  # worker -> why its last partial was refused
        self._floor: dict[str, int] = {}  # lowest request id an answer may echo
        self._asked: dict[str, int] = {}  # newest request id sent to each worker
        self._answered: dict[str, int] = {}  # newest request id each worker answered
        self._got: dict[str, PartialSum] = {}  # each worker's newest usable partial
        self._final: int | None = None  # id of the sealing request, once sent
        self._absent: set[str] = set()  # left out of this round (leave_out)
        self._on_merged: Callable[[Merged], Any] | None = None

    def begin(
        self,
        round_id: int,
        base_version: int,
        spec: TensorSpec,
        on_merged: Callable[[Merged], Any],
    ) -> None:
        """A new round: forget partials; the partials workers send at the deadline count."""
        self.round, self.base_version, self.spec = round_id, base_version, dict(spec)
        self._floor = dict.fromkeys(self.workers, 0)
        self._asked = dict.fromkeys(self.workers, 0)
        self._answered = {}
        self._got = {}
        self._final = None
        self._absent = set()
        self.refused = {}
        self._on_merged = on_merged

    @property
    def expected(self) -> tuple[str, ...]:
        """The workers whose partials the round waits for: all but those left out."""
        return tuple(w for w in self.workers if w not in self._absent)

    def leave_out(self, workers: Sequence[str]) -> None:
        """Go on without ``workers`` (site gateways cut off from the centre) this round.

        Before the seal, one that answers again is taken back. Once sealed, the round is
        sealed again with a final request that names only the others: a gateway left out
        learns from it (or from the next task) that its round closed without it, and tells
        its devices their updates came too late. Never the last worker."""
        new = [w for w in workers if w in self.workers and w not in self._absent]
        if not new or len(self._absent) + len(new) >= len(self.workers):
            return
        self._absent.update(new)
        for w in new:
            self._got.pop(w, None)
        log.warning("round %d: going on without %s", self.round, ", ".join(sorted(new)))
        if self.sealing:
            self._final = None
            self.request(final=True)
        elif self._got and len(self._got) == len(self.expected):
            self._complete()

    @property
    def sealing(self) -> bool:
        return self._final is not None

    def request(self, *, final: bool = False) -> None:
        """Ask every worker for its partial now; ``on_merged`` follows each complete set.
        ``final`` seals the round: from now on only answers to this request (or later) count."""
        final = final or self.sealing
        # A final request names its workers when some are left out: they must know.
        named = self.expected if final and self._absent else None
        req = PartialRequest(self.round, next(self._ids), named, final=final)
        if final and not self.sealing:
            self._final = req.request
            self._floor = dict.fromkeys(self.workers, req.request)
            self._got = {}
        self._send(req, self.workers if named is None else named)

    def outstanding(self) -> list[str]:
        """Workers that have not answered the newest request sent to them."""
        # Answered, not merely sent a partial: the unasked one at the deadline (request 0)
        # answers nothing.
        return [
            w
            for w in self.expected
            if w not in self._got or self._answered.get(w, 0) < self._asked[w]
        ]

    def missing(self) -> list[str]:
        """Workers without a usable partial for this round yet."""
        return [w for w in self.expected if w not in self._got]

    def _send(self, req: PartialRequest, workers: Sequence[str]) -> None:
        for w in workers:
            self._asked[w] = req.request
        self._publish(self.topics.request, req.to_bytes())

    def handle(self, topic: str, payload: bytes) -> bool:
        """Take a message from ``{p}/partial/+``; False if the topic is not a partial."""
        worker = self.topics.worker_of(topic)
        if worker is None:
            return False
        if worker not in self._floor:
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
        if p.request < self._floor[worker]:
            return True  # made before a drop or the seal: superseded
        if self.policy is not None and p.policy != self.policy:
            why = f"worker policy {p.policy} != aggregator's {self.policy}"
            if self.refused.get(worker) != why:
                log.error("partial of %s refused: %s (start it with matching flags)", worker, why)
            self.refused[worker] = why
            return True
        if self.sealing and not p.dense:
            log.warning("summary partial of %s after the seal ignored", worker)
            return True
        if worker in self._absent:
            if self.sealing:
                return True  # sealed without it: its answer comes too late
            self._absent.discard(worker)  # back before the seal: it counts again
            log.info("round %d: %s answers again", self.round, worker)
        self.refused.pop(worker, None)
        self._answered[worker] = max(self._answered.get(worker, 0), p.request)
        self._got[worker] = p  # one worker's partials arrive in order: the newest wins
        if len(self._got) == len(self.expected):
            self._complete()
        return True

    def _complete(self) -> None:
        partials = [self._got[w] for w in self.expected]
        dup = overlaps(partials)
        if dup:
            drops: dict[str, list[str]] = {}
            for device, ws in dup.items():
                for w in ws[1:]:  # the first worker in name order keeps its copy
                    drops.setdefault(w, []).append(device)
            log.warning("round %d: devices counted twice %s: re-asking", self.round, dup)
            self.overlaps_resolved += len(dup)
            for w, devices in sorted(drops.items()):
                req = PartialRequest(
                    self.round, next(self._ids), (w,), tuple(devices), final=self.sealing
                )
                self._floor[w] = req.request
                self._got.pop(w, None)
                self._send(req, [w])
            return
        if self._on_merged is not None:
            merged = merge_partials(partials)
            merged.final = self.sealing
            merged.left_out = tuple(sorted(self._absent))
            self._on_merged(merged)
