"""``RoundTask``: what the aggregator asks of devices in one round (retained on
``{p}/round/current``), signed by the aggregator (protocol §5.2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Self

from fedge.envelopes.common import (
    _MAX_ROUND,
    SCHEMA_VERSION,
    SIGNATURE_BYTES,
    Kind,
    _codec,
    _nonce,
    _open,
    _opt_tuple,
)
from fedge.envelopes.hyper import TrainHyper
from fedge.errors import InvalidValue
from fedge.limits import DEFAULT_LIMITS, Limits
from fedge.masks import Mask
from fedge.trainable import read_trainable, trainable_digest
from fedge.wire import pack


@dataclass(frozen=True)
class RoundTask:
    """Opens a round: who trains, from which model version, how, and until when."""

    round: int
    base_version: int
    deadline: float
    codec: str
    hyper: TrainHyper
    nonce: bytes
    selected: tuple[str, ...] | None = None
    issued: float = 0.0
    # Async mode: the oldest round whose updates are still accepted (None: this round only).
    # A device keeps unreceipted updates of rounds from here on in its outbox.
    accepts_from: int | None = None
    # Ed25519 by the aggregator over digest(): every field above. Empty when the fleet does
    # not sign; then it is not sent at all (an optional key added after v1's freeze).
    signature: bytes = b""
    # Pruning (fedge.masks): the weights devices keep at zero this round; None: dense. An
    # optional key, covered by the signature through the mask's digest.
    mask: Mask | None = None
    # Fine-tuning (fedge.trainable): the only tensors devices train and send; None: all. An
    # optional key, covered by the signature through the names' digest.
    trainable: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.accepts_from is not None and not 1 <= self.accepts_from <= self.round:
            raise InvalidValue(f"accepts_from must be in [1, round], got {self.accepts_from}")
        if self.trainable is not None and (
            not self.trainable or len(set(self.trainable)) != len(self.trainable)
        ):
            raise InvalidValue("trainable must name distinct tensors, at least one")

    def asks(self, device: str) -> bool:
        return self.selected is None or device in self.selected

    @property
    def oldest_accepted(self) -> int:
        """The oldest round an update may still answer."""
        return self.round if self.accepts_from is None else self.accepts_from

    def digest(self) -> bytes:
        """What the aggregator signs: fedge.identity.task_digest over every field."""
        from fedge.identity import task_digest

        h = self.hyper
        return task_digest(
            self.round,
            self.base_version,
            deadline=self.deadline,
            issued=self.issued,
            codec=self.codec,
            hyper=(
                h.epochs,
                h.batch_size,
                h.lr,
                h.momentum,
                h.weight_decay,
                h.prox_mu,
                h.qat,
                h.calibrate,
                h.early_stop_patience,
                h.val_fraction,
            ),
            nonce=self.nonce,
            selected=self.selected,
            accepts_from=self.accepts_from,
            mask=self.mask.digest() if self.mask else None,
            trainable=trainable_digest(self.trainable) if self.trainable is not None else None,
        )

    def to_bytes(self) -> bytes:
        extra: dict[str, Any] = {}
        if self.selected is not None:  # absent: every device (optional since v1)
            extra["selected"] = list(self.selected)
        if self.accepts_from is not None:
            extra["accepts_from"] = self.accepts_from
        if self.signature:
            extra["signature"] = self.signature
        if self.mask:
            extra["mask"] = self.mask.to_map()
        if self.trainable is not None:
            extra["trainable"] = list(self.trainable)
        return pack(
            {
                "v": SCHEMA_VERSION,
                "kind": str(Kind.TASK),
                "round": self.round,
                "base_version": self.base_version,
                "deadline": float(self.deadline),
                "issued": float(self.issued),
                "codec": self.codec,
                "hyper": self.hyper.to_map(),
                "nonce": self.nonce,
                **extra,
            }
        )

    @classmethod
    def from_bytes(cls, payload: bytes, limits: Limits = DEFAULT_LIMITS) -> Self:
        f = _open(payload, Kind.TASK, limits)
        round_id = f.int("round", 1, _MAX_ROUND)
        accepts_from = f.int("accepts_from", 1, round_id, optional=True)
        task = cls(
            round=round_id,
            base_version=f.int("base_version", 0, _MAX_ROUND),
            deadline=f.float("deadline", 0.0),
            issued=f.float("issued", 0.0),
            codec=_codec(f),
            hyper=TrainHyper._read(f.map("hyper"), limits),
            nonce=_nonce(f),
            selected=_opt_tuple(f.str_list("selected", optional=True)),
            accepts_from=accepts_from,
            signature=f.bytes("signature", max_len=SIGNATURE_BYTES, optional=True) or b"",
            mask=_mask(f.map("mask", optional=True), limits),
            trainable=read_trainable(f.str_list("trainable", optional=True), limits.max_tensors),
        )
        f.done()
        return task


def _mask(obj: Any, limits: Limits) -> Mask | None:
    if obj is None:
        return None
    return Mask.from_map(obj, limits.max_tensors, limits.max_str_len) or None
