"""What sharded aggregation sends between aggregator processes: partial sums and requests.

Shard workers share one MQTT 5 shared subscription to the fleet's updates
(``$share/<group>/{p}/update/+``), so each folds a share. A reducer publishes a
``PartialRequest`` on ``{p}/round/close``; each worker answers on ``{p}/partial/<worker>``
with a ``PartialSum``: ``sum_i n_i * delta_i`` (fp32 tensor records), ``sum_i n_i``, and which
update of which device it counted, so the reducer can check that no device is counted twice.

Like the device envelopes these are frozen dataclasses over msgpack maps with ``v`` and
``kind``; ``from_bytes`` validates everything and raises ``ProtocolError``. They are a contract
between aggregator processes, not devices, so they carry their own schema version.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Self

import numpy as np

from fedge.errors import ProtocolError
from fedge.limits import DEFAULT_LIMITS, Limits
from fedge.tensors import TensorSpec, decode_records, dense_record, encode_records
from fedge.topics import Topics, validate_device_id
from fedge.wire import Fields, open_envelope, pack

__all__ = ["PARTIALS_SCHEMA_VERSION", "PartialRequest", "PartialSum", "ShardPolicy", "ShardTopics"]

# 2: requests carry ``final`` (the reducer seals the round), partials their worker's policy.
# 3: ``tensors`` may be nil: a summary (counts and ids only) that a site gateway sends to
# every request but the final one, so one dense partial per round crosses the bridge.
PARTIALS_SCHEMA_VERSION = 3
_MAX_ROUND = 2**31
_MAX_REQUEST = 2**62
_KIND_SUM = "partial"
_KIND_REQUEST = "partial_request"


@dataclass(frozen=True)
class ShardTopics:
    """The topics of sharded aggregation, next to a fleet's ``Topics``."""

    topics: Topics

    def shared_updates(self, group: str) -> str:
        return f"$share/{validate_device_id(group)}/{self.topics.all_updates}"

    @property
    def request(self) -> str:
        # Under round/: the shipped ACL already lets every client read it, only the
        # "aggregator" user write it; devices subscribe to round/current only.
        return f"{self.topics.prefix}/round/close"

    def partial(self, worker: str) -> str:
        return f"{self.topics.prefix}/partial/{validate_device_id(worker)}"

    @property
    def all_partials(self) -> str:
        return f"{self.topics.prefix}/partial/+"

    def worker_of(self, topic: str) -> str | None:
        return self.topics.device_of(topic, "partial")


def _open(payload: bytes, kind: str, limits: Limits) -> Fields:
    return open_envelope(payload, kind, PARTIALS_SCHEMA_VERSION, limits)


def _ids(f: Fields, key: str, *, optional: bool = False) -> tuple[str, ...] | None:
    raw = f.str_list(key, optional=optional)
    if raw is None:
        return None
    try:
        ids = tuple(validate_device_id(x) for x in raw)
    except ValueError as e:
        raise ProtocolError("schema", f"{key}: {e}") from None
    if len(set(ids)) != len(ids):
        raise ProtocolError("schema", f"{key} lists an id twice")
    return ids


@dataclass(frozen=True)
class ShardPolicy:
    """What a worker enforces per update; the reducer takes only partials made under its own:
    signatures required, the norm bound applied per update (0 = none), the clamp of reported
    sample counts."""

    signed: bool
    clip_norm: float
    max_num_samples: int

    def to_map(self) -> dict[str, object]:
        return {
            "signed": self.signed,
            "clip_norm": float(self.clip_norm),
            "max_num_samples": self.max_num_samples,
        }

    @classmethod
    def read(cls, raw: object, limits: Limits) -> ShardPolicy:
        if not isinstance(raw, dict):
            raise ProtocolError("schema", "partial.policy must be a map")
        f = Fields(raw, "partial.policy", limits)
        policy = cls(
            signed=f.bool("signed"),
            clip_norm=f.float("clip_norm", 0.0, 1e30),
            max_num_samples=f.int("max_num_samples", 1, 2**62),
        )
        f.done()
        return policy


@dataclass(frozen=True)
class PartialRequest:
    """The reducer asks ``workers`` (all when None) for their partial sum of ``round``.

    ``drop`` lists devices the answering workers must leave out (and keep out for the rest of
    the round): how the reducer resolves a device counted by two workers. ``request`` grows
    with every request of a round, so a late answer to an older one is recognised. ``final``
    seals the round: the worker answers, then refuses (``round_closed``, no receipt) every
    later update of that round, so the sums the round closes on hold every update a worker
    confirmed.
    """

    round: int
    request: int
    workers: tuple[str, ...] | None = None
    drop: tuple[str, ...] = ()
    final: bool = False

    def asks(self, worker: str) -> bool:
        return self.workers is None or worker in self.workers

    def to_bytes(self) -> bytes:
        return pack(
            {
                "v": PARTIALS_SCHEMA_VERSION,
                "kind": _KIND_REQUEST,
                "round": self.round,
                "request": self.request,
                "workers": list(self.workers) if self.workers is not None else None,
                "drop": list(self.drop),
                "final": self.final,
            }
        )

    @classmethod
    def from_bytes(cls, payload: bytes, limits: Limits = DEFAULT_LIMITS) -> Self:
        f = _open(payload, _KIND_REQUEST, limits)
        req = cls(
            round=f.int("round", 1, _MAX_ROUND),
            request=f.int("request", 1, _MAX_REQUEST),
            workers=_ids(f, "workers", optional=True),
            drop=_ids(f, "drop") or (),
            final=f.bool("final"),
        )
        f.done()
        return req


@dataclass(frozen=True, eq=False)
class PartialSum:
    """One worker's share of a round: ``sums = sum_i n_i * delta_i``, ``total_weight = sum n_i``.

    ``request`` is the id of the request answered (0: sent unasked at the task's deadline).
    ``counted`` maps each device folded to its update id; ``count == len(counted)``. Tensors
    travel as fp32: the rounding (2**-24 of each partial) is below the fp32 model's own.
    Empty ``sums`` is a summary (``dense`` False): who is counted, without the tensors; the
    reducer may decide to seal on it but closes only on dense partials.
    """

    round: int
    base_version: int
    worker: str
    request: int
    total_weight: float
    counted: Mapping[str, str]
    sums: Mapping[str, np.ndarray]
    uplink_bytes: int = 0
    loss_sum: float = 0.0  # sum_i n_i * loss_i, for the round's train loss
    rejected: Mapping[str, int] = field(default_factory=dict)
    policy: ShardPolicy = ShardPolicy(signed=False, clip_norm=0.0, max_num_samples=100_000)

    @property
    def count(self) -> int:
        return len(self.counted)

    @property
    def dense(self) -> bool:
        return bool(self.sums)

    def to_bytes(self) -> bytes:
        devices = sorted(self.counted)
        tensors = (
            encode_records([dense_record(k, np.asarray(v), "<f4") for k, v in self.sums.items()])
            if self.sums
            else None
        )
        return pack(
            {
                "v": PARTIALS_SCHEMA_VERSION,
                "kind": _KIND_SUM,
                "round": self.round,
                "base_version": self.base_version,
                "worker": self.worker,
                "request": self.request,
                "count": self.count,
                "total_weight": float(self.total_weight),
                "devices": devices,
                "update_ids": [self.counted[d] for d in devices],
                "tensors": tensors,
                "uplink_bytes": self.uplink_bytes,
                "loss_sum": float(self.loss_sum),
                "rejected": dict(self.rejected),
                "policy": self.policy.to_map(),
            }
        )

    @classmethod
    def from_bytes(cls, payload: bytes, spec: TensorSpec, limits: Limits = DEFAULT_LIMITS) -> Self:
        """Decode and validate against the model's tensor ``spec`` (names, shapes, finite)."""
        f = _open(payload, _KIND_SUM, limits)
        rnd = f.int("round", 1, _MAX_ROUND)
        base = f.int("base_version", 0, _MAX_ROUND)
        worker = _worker(f)
        request = f.int("request", 0, _MAX_REQUEST)
        count = f.int("count", 0, limits.max_array_len)
        total = f.float("total_weight", 0.0)
        devices = _ids(f, "devices") or ()
        update_ids = f.str_list("update_ids")
        if not count == len(devices) == len(update_ids):
            raise ProtocolError(
                "schema",
                f"partial of {worker}: count {count}, {len(devices)} devices, "
                f"{len(update_ids)} update ids",
            )
        # Every n_i is an integer >= 1; no update means no weight.
        if total < count or (count == 0 and total != 0.0):
            raise ProtocolError(
                "schema", f"partial of {worker}: total_weight {total} for {count} updates"
            )
        raw = f.bytes("tensors", optional=True)
        sums = decode_records(raw, spec, ("<f4",), limits) if raw is not None else {}
        uplink = f.int("uplink_bytes")
        loss_sum = f.float("loss_sum")
        rejected = {k: _count(k, v) for k, v in f.number_map("rejected").items()}
        policy = ShardPolicy.read(f.map("policy"), limits)
        # No update weighs more than the clamp: a larger total is a lie or a misconfiguration.
        if total > count * policy.max_num_samples:
            raise ProtocolError(
                "schema",
                f"partial of {worker}: total_weight {total} exceeds {count} x "
                f"{policy.max_num_samples}",
            )
        f.done()
        return cls(
            rnd,
            base,
            worker,
            request,
            total,
            dict(zip(devices, update_ids, strict=True)),
            sums,
            uplink,
            loss_sum,
            rejected,
            policy,
        )


def _worker(f: Fields) -> str:
    w = f.str("worker")
    try:
        return validate_device_id(w)
    except ValueError as e:
        raise ProtocolError("schema", f"worker: {e}") from None


def _count(key: str, v: float) -> int:
    if not (math.isfinite(v) and v >= 0 and v == int(v)):
        raise ProtocolError("schema", f"rejected.{key} = {v} is not a count")
    return int(v)
