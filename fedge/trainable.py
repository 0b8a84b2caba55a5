"""Fine-tuning chosen tensors: which tensors of the model a round trains (protocol §5.2,
"trainable").

The operator names them with glob patterns (``model.trainable: ["fc3.*"]``, matched with
``fnmatch.fnmatchcase`` against the model's tensor names); the aggregator resolves them once
against its model and the task carries the exact names, so a device needs no glob matcher.
Devices train only those tensors (the others are frozen) and send the delta of those only;
the aggregator reads an update against that reduced spec and folds zeros for the frozen
ones, then keeps them bit-identical. Pure: no torch, no role.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Sequence
from fnmatch import fnmatchcase

from fedge.errors import InvalidValue, ProtocolError
from fedge.tensors import TensorSpec

__all__ = [
    "check_trainable",
    "frozen",
    "read_trainable",
    "resolve",
    "split_patterns",
    "trainable_digest",
]


def split_patterns(text: str | None) -> tuple[str, ...] | None:
    """``"fc3.*,fc2.bias"`` -> the patterns (a command line's ``--trainable``); None or
    blank: None (full training)."""
    if text is None or not text.strip():
        return None
    return tuple(p.strip() for p in text.split(",") if p.strip())


def resolve(patterns: Iterable[str], names: Iterable[str]) -> tuple[str, ...]:
    """The tensor names (in ``names`` order) matched by any of ``patterns``.

    ``InvalidValue`` when a pattern matches nothing (a typo would otherwise freeze the whole
    model silently) or when every tensor matches (that is full training: leave it unset).
    """
    pats, all_names = list(patterns), list(names)
    if not pats:
        raise InvalidValue("trainable: name at least one pattern, or leave it unset")
    for p in pats:
        if not any(fnmatchcase(n, p) for n in all_names):
            raise InvalidValue(
                f"trainable pattern {p!r} matches no tensor of the model "
                f"(it has {', '.join(all_names[:8])}{', ...' if len(all_names) > 8 else ''})"
            )
    chosen = tuple(n for n in all_names if any(fnmatchcase(n, p) for p in pats))
    if len(chosen) == len(all_names):
        raise InvalidValue(
            "trainable matches every tensor of the model: leave it unset for full training"
        )
    return chosen


def check_trainable(trainable: Collection[str], spec: TensorSpec) -> None:
    """``InvalidValue`` naming the tensors ``trainable`` lists that the model lacks."""
    unknown = sorted(set(trainable) - set(spec))
    if unknown:
        raise InvalidValue(f"trainable names tensors the model does not have: {unknown[:5]}")


def frozen(trainable: Collection[str], spec: TensorSpec) -> list[str]:
    """The tensors of ``spec`` a round with ``trainable`` leaves alone."""
    keep = set(trainable)
    return [k for k in spec if k not in keep]


def trainable_digest(trainable: Sequence[str]) -> bytes:
    """SHA-256 of the names in task order, each as one length byte and its UTF-8 bytes:
    what the task signature covers of the field (fedge.identity.task_digest)."""
    h = hashlib.sha256()
    for name in trainable:
        b = name.encode("utf-8")
        if not 1 <= len(b) <= 255:
            raise InvalidValue(f"trainable name {name[:40]!r} must be 1-255 bytes in UTF-8")
        h.update(bytes([len(b)]) + b)
    return h.digest()


def read_trainable(names: list[str] | None, max_tensors: int) -> tuple[str, ...] | None:
    """The task's ``trainable`` array off the wire: non-empty, distinct, at most
    ``max_tensors`` names of 1-255 UTF-8 bytes; ``ProtocolError("schema")`` otherwise."""
    if names is None:
        return None
    if not names or len(names) > max_tensors or len(set(names)) != len(names):
        raise ProtocolError(
            "schema", f"task.trainable must list 1-{max_tensors} distinct tensor names"
        )
    if not all(1 <= len(n.encode("utf-8")) <= 255 for n in names):
        raise ProtocolError("schema", "task.trainable names must be 1-255 bytes long")
    return tuple(names)
