"""The device's upload pipeline, from trained weights to the signed bytes of a `ModelUpdate`.

    delta = trained - global  ->  local DP  ->  + residual  ->  codec  ->  envelope  ->  signature

A pure step: no MQTT, no disk. `build_upload` returns the payload and the residual the
device holds afterwards; the agent owns the order that crash safety needs (outbox entry
first, then the residual, then the publish: see ``docs/reliability.md``).

Local DP comes before the codec: error feedback then works on what privacy allows to leave,
never on the raw delta. The codec's randomness (stochastic rounding) is seeded by the device
seed and the round, so a device re-encoding a round sends the same bytes.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from edge_agent.privacy import LocalDP
from edge_agent.residual import Residual
from fedge.codecs import Codec, masked_codec
from fedge.envelopes import ModelUpdate, RoundTask
from fedge.identity import SigningKey
from fedge.limits import DEFAULT_LIMITS, Limits
from fedge.masks import Keep, live, live_spec, scatter
from fedge.tensors import spec_of

__all__ = [
    "Calibration",
    "TrainOutcome",
    "Uplink",
    "Upload",
    "build_upload",
    "calibration",
    "encode_with_feedback",
    "train_metrics",
]

log = logging.getLogger(__name__)

Calibration = dict[str, tuple[float, float]]


class TrainOutcome(Protocol):
    """What a train function returns: `edge_agent.trainer.TrainResult` or a look-alike.

    ``epochs`` and ``val_loss`` are optional (read with ``getattr``): a simulated train
    function may leave them out.
    """

    @property
    def weights(self) -> Mapping[str, np.ndarray]: ...
    @property
    def num_samples(self) -> int: ...
    @property
    def loss(self) -> float: ...
    @property
    def accuracy(self) -> float: ...
    @property
    def seconds(self) -> float: ...


@dataclass(frozen=True)
class Uplink:
    """What a device builds every update with, fixed for its life."""

    device_id: str
    seed: int = 0
    limits: Limits = DEFAULT_LIMITS
    local_dp: LocalDP | None = None
    signing_key: SigningKey | None = None


@dataclass(frozen=True)
class Upload:
    """One update ready to go, and what the device keeps of it."""

    update: ModelUpdate
    payload: bytes  # update.to_bytes(): what goes to the outbox and on the wire
    residual: Residual  # the device's error-feedback residual after this update
    save_residual: bool  # it changed: persist it right after the outbox entry


def build_upload(
    uplink: Uplink,
    base: Mapping[str, np.ndarray],
    result: TrainOutcome,
    task: RoundTask,
    codec: Codec,
    residual: Residual,
    *,
    calib: Calibration | None = None,
    update_id: str | None = None,
    dp_rng: np.random.Generator | None = None,
) -> Upload:
    """The update of ``task`` from ``result`` trained on ``base``; ``residual`` is not modified.

    ``update_id`` defaults to a fresh uuid4 and ``dp_rng`` (local DP noise) to OS entropy, as
    on a device; tests pin them. Raises ValueError or `ProtocolError` when ``codec`` cannot
    encode this delta (the round is then skipped).
    """
    delta = {k: result.weights[k] - base[k] for k in base}
    keep = task.mask.keep(spec_of(base)) if task.mask else None
    if uplink.local_dp is not None:
        delta = uplink.local_dp.privatize(delta, dp_rng)
    rng = np.random.default_rng([uplink.seed & (2**64 - 1), task.round])
    blob, after, changed = encode_with_feedback(
        delta, codec, residual, rng, uplink.limits, keep=keep, names=task.trainable
    )
    update = ModelUpdate(
        device=uplink.device_id,
        round=task.round,
        base_version=task.base_version,
        update_id=update_id if update_id is not None else uuid.uuid4().hex,
        nonce=task.nonce,
        num_samples=result.num_samples,
        codec=task.codec,
        delta=blob,
        metrics=train_metrics(result),
        calib=calib if calib is not None else {},
    )
    if uplink.signing_key is not None:
        update = replace(update, signature=uplink.signing_key.sign(update.digest()))
    return Upload(update, update.to_bytes(), after, changed)


def encode_with_feedback(
    delta: Mapping[str, np.ndarray],
    codec: Codec,
    residual: Residual,
    rng: np.random.Generator,
    limits: Limits = DEFAULT_LIMITS,
    *,
    keep: Keep | None = None,
    names: Collection[str] | None = None,
) -> tuple[bytes, Residual, bool]:
    """Encode ``delta + residual``; keep what the aggregator will not see.

    Returns the blob, the residual after it (a new object: ``residual`` is not modified) and
    whether that residual must be persisted. A lossless codec flushes any residual left by
    earlier lossy rounds and keeps none; with no residual to flush there is nothing to save.

    With a pruning mask (``keep``) only the live entries of masked tensors are encoded
    (``fedge.masks.live``), a top-k codec keeping its budget of the full model
    (``fedge.codecs.masked_codec``); the residual stays in the model's full shape, so it survives a
    mask that grows between rounds, and its pruned entries are dropped (zero).

    With ``names`` (a fine-tuning round's trainable tensors) only those tensors are encoded,
    by the same path; the residual of the frozen ones is dropped (they do not move).
    """
    after = residual.copy()
    target = after.apply(delta)
    selective = bool(keep) or names is not None
    keep = keep or {}
    if selective:
        target = {k: _what_moves(k, v, keep, names) for k, v in target.items()}
        sent_live = live(target, keep, names)
        if keep:  # pruning: a top-k codec keeps the full model's budget (masked_codec)
            full = sum(v.size for v in target.values())
            codec = masked_codec(codec, full, sum(v.size for v in sent_live.values()))
        blob = codec.encode(sent_live, rng)
    else:
        blob = codec.encode(target, rng)
    if codec.lossless:
        if not after:
            return blob, after, False
        after.reset()
        return blob, after, True
    if selective:
        spec = spec_of(target)
        sent = scatter(codec.decode(blob, live_spec(spec, keep, names), limits), keep, spec)
    else:
        sent = codec.decode(blob, spec_of(target), limits)
    after.update(target, sent)
    return blob, after, True


def _what_moves(name: str, v: np.ndarray, keep: Keep, names: Collection[str] | None) -> np.ndarray:
    """``v`` with what cannot move this round zeroed: a frozen tensor, pruned weights."""
    if names is not None and name not in names:
        return np.zeros_like(v)
    if name in keep:
        return np.where(keep[name], v, np.float32(0))
    return v


def calibration(uplink: Uplink, onnx: bytes, x: np.ndarray, task: RoundTask) -> Calibration:
    """Activation ranges of the held model on local data, when the round asks for them."""
    if not task.hyper.calibrate:
        return {}
    from edge_agent.calibration import compute_ranges

    try:
        return compute_ranges(onnx, x, seed=uplink.seed)
    except ValueError as e:
        log.warning("%s: no calibration ranges for round %d: %s", uplink.device_id, task.round, e)
        return {}


def train_metrics(result: TrainOutcome) -> dict[str, float]:
    """What the update reports of local training (``ModelUpdate.metrics``)."""
    out = {"loss": result.loss, "accuracy": result.accuracy, "seconds": result.seconds}
    epochs = getattr(result, "epochs", 0)
    if epochs:
        out["epochs"] = epochs
    val_loss = getattr(result, "val_loss", None)
    if val_loss is not None:
        out["val_loss"] = val_loss
    return out
