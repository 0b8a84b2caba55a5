"""The aggregator's durable state, written atomically after every version.

It holds the model weights, the version, the last round id used (round ids are never reused,
so a device that already answered a round is never asked to train it again), who was counted
in the round that made this version, and the task of the round that is open, if any: with
that round's journal (aggregator/journal.py) a restart resumes the round where it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import msgpack
import numpy as np

from fedge.limits import Limits
from fedge.support.fsutil import atomic_write
from fedge.tensors import decode_records, dense_record, encode_records, spec_of

__all__ = ["Checkpoint", "StateFile", "load_checkpoint", "plain", "save_checkpoint"]

_FORMAT = 1


@dataclass(frozen=True)
class Checkpoint:
    version: int
    last_round: int
    weights: dict[str, np.ndarray]
    counted: tuple[str, ...] = ()
    failed_rounds: int = 0
    open_task: bytes | None = None
    # Server-side state that must survive a restart: optimizer moments, DP rounds spent, lr
    # schedules. Flat keys -> float32 arrays or numbers.
    state: dict[str, Any] = field(default_factory=dict)
    # Async mode: tasks of the rounds still accepted (stale but within max_staleness), and
    # who was counted in each (device -> update id), so a resend after a restart stays a
    # duplicate.
    recent_tasks: tuple[bytes, ...] = ()
    recent_counted: dict[int, dict[str, str]] = field(default_factory=dict)
    # The lower median of the last version's update weights: the next round's cap reference
    # (aggregator/weighting.py); 0 before the first version.
    weight_reference: int = 0
    # The downlink chain (aggregator/downlink.py): the weights devices hold and the retained
    # patches (to_version, signed bytes); None and () when the service sends full models.
    view: dict[str, np.ndarray] | None = None
    patches: tuple[tuple[int, bytes], ...] = ()


def save_checkpoint(path: Path, ckpt: Checkpoint) -> None:
    blob = msgpack.packb(
        {
            "format": _FORMAT,
            "version": ckpt.version,
            "last_round": ckpt.last_round,
            "counted": list(ckpt.counted),
            "failed_rounds": ckpt.failed_rounds,
            "open_task": ckpt.open_task,
            "recent_tasks": list(ckpt.recent_tasks),
            "recent_counted": [[r, c] for r, c in ckpt.recent_counted.items()],
            "weight_reference": ckpt.weight_reference,
            "state_scalars": {k: v for k, v in ckpt.state.items() if not isinstance(v, np.ndarray)},
            "state_arrays": encode_records(
                [
                    dense_record(k, v, "<f4")
                    for k, v in ckpt.state.items()
                    if isinstance(v, np.ndarray)
                ]
            ),
            "state_spec": {
                k: list(v.shape) for k, v in ckpt.state.items() if isinstance(v, np.ndarray)
            },
            "spec": {k: list(s) for k, s in spec_of(ckpt.weights).items()},
            "weights": encode_records([dense_record(k, v, "<f4") for k, v in ckpt.weights.items()]),
            "view": None
            if ckpt.view is None
            else encode_records([dense_record(k, v, "<f4") for k, v in ckpt.view.items()]),
            "patches": [[v, p] for v, p in ckpt.patches],
        },
        use_bin_type=True,
    )
    atomic_write(path, blob)


def load_checkpoint(path: Path) -> Checkpoint | None:
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    obj = msgpack.unpackb(raw, raw=False)
    if obj.get("format") != _FORMAT:
        raise ValueError(f"{path}: unknown checkpoint format {obj.get('format')!r}")
    spec: Mapping[str, tuple[int, ...]] = {k: tuple(s) for k, s in obj["spec"].items()}
    big = Limits(max_payload_bytes=len(raw) + 1, max_decompressed_bytes=len(raw) + 1)
    weights = decode_records(obj["weights"], spec, ("<f4",), big)
    return Checkpoint(
        version=obj["version"],
        last_round=obj["last_round"],
        weights=weights,
        counted=tuple(obj["counted"]),
        failed_rounds=obj.get("failed_rounds", 0),
        open_task=obj.get("open_task"),
        state=_load_state(obj, big),
        recent_tasks=tuple(obj.get("recent_tasks", ())),
        recent_counted={int(r): dict(c) for r, c in obj.get("recent_counted", ())},
        weight_reference=int(obj.get("weight_reference", 0)),
        view=None if obj.get("view") is None else decode_records(obj["view"], spec, ("<f4",), big),
        patches=tuple((int(v), bytes(p)) for v, p in obj.get("patches", ())),
    )


def _load_state(obj: dict[str, Any], limits: Limits) -> dict[str, Any]:
    state: dict[str, Any] = dict(obj.get("state_scalars", {}))
    spec = {k: tuple(v) for k, v in obj.get("state_spec", {}).items()}
    if spec:
        state.update(decode_records(obj["state_arrays"], spec, ("<f4",), limits))
    return state


class _Stateful(Protocol):
    def state_dict(self) -> Mapping[str, Any]: ...

    def load_state_dict(self, d: Mapping[str, Any]) -> None: ...


class StateFile:
    """The service's checkpoint file, with the cross-round state of its strategy (keys
    ``strategy.*``) and adaptive schedules (their own keys) folded in on save and handed
    back to them on load, so a restart continues the same optimizer and schedules."""

    def __init__(
        self, path: Path, strategy: _Stateful, adaptive: _Stateful, *extra: _Stateful
    ) -> None:
        self.path = Path(path)
        self.strategy = strategy
        self.adaptive = adaptive
        # More state with keys of its own (the pruner's ``pruning.*``).
        self.extra = extra

    def save(self, ckpt: Checkpoint) -> None:
        """Write ``ckpt`` atomically, its ``state`` taken from the strategy and schedules."""
        state = {f"strategy.{k}": plain(v) for k, v in self.strategy.state_dict().items()}
        state.update(self.adaptive.state_dict())
        for part in self.extra:
            state.update({k: plain(v) for k, v in part.state_dict().items()})
        save_checkpoint(self.path, replace(ckpt, state=state))

    def load(self) -> Checkpoint | None:
        """The checkpoint, None if there is none; restores the strategy and schedules."""
        ckpt = load_checkpoint(self.path)
        if ckpt is not None:
            strategy = {
                k.removeprefix("strategy."): v
                for k, v in ckpt.state.items()
                if k.startswith("strategy.")
            }
            if strategy:
                self.strategy.load_state_dict(strategy)
            self.adaptive.load_state_dict(ckpt.state)
            for part in self.extra:
                part.load_state_dict(ckpt.state)
        return ckpt


def plain(v: Any) -> Any:
    """Strategy state values for msgpack: float32 arrays stay arrays, numpy scalars -> Python."""
    if isinstance(v, np.ndarray):
        return v.astype(np.float32)
    if isinstance(v, np.generic):
        return v.item()
    return v
