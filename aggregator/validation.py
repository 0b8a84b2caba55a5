"""The boundary check of an update: everything a device sends is untrusted.

Order matters: sizes and schema first (cheap, before any decompression), then the round's own
rules (round, nonce, base version, codec, selection, duplicates), then the device's signature
when the fleet signs, and only then the delta is decoded, which checks names, shapes, dtypes
and finiteness against the model spec.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aggregator.keyring import KeyRing
from aggregator.rounds import OpenRound
from fedge.codecs import parse_codec
from fedge.envelopes import ModelUpdate
from fedge.errors import InvalidUpdate
from fedge.limits import Limits
from fedge.masks import live_spec, scatter
from fedge.tensors import TensorSpec

__all__ = ["Accepted", "validate_update"]


@dataclass(frozen=True)
class Accepted:
    update: ModelUpdate
    delta: dict[str, np.ndarray]
    num_samples: int  # after the absolute clamp (max_num_samples)
    clamped: bool  # the weight is below the reported count
    weight: int  # what the update weighs: num_samples, at most the round's cap


def validate_update(
    topic_device: str,
    payload: bytes | ModelUpdate,
    rnd: OpenRound,
    spec: TensorSpec,
    limits: Limits,
    max_num_samples: int,
    keyring: KeyRing | None = None,
    max_weight: int | None = None,
) -> Accepted:
    """``payload``: the message bytes, or the update a caller already parsed from them with
    ``ModelUpdate.from_bytes`` (to pick its round first: one parse per update)."""
    upd = payload if isinstance(payload, ModelUpdate) else ModelUpdate.from_bytes(payload, limits)
    t = rnd.task
    if upd.device != topic_device:
        raise InvalidUpdate("device_mismatch", f"{topic_device} sent an update signed {upd.device}")
    if upd.round != t.round:
        raise InvalidUpdate("wrong_round", f"{upd.device}: round {upd.round}, open is {t.round}")
    if upd.nonce != t.nonce:
        raise InvalidUpdate("bad_nonce", f"{upd.device}: nonce does not match round {t.round}")
    if upd.base_version != t.base_version:
        raise InvalidUpdate(
            "wrong_base", f"{upd.device}: base v{upd.base_version}, round uses v{t.base_version}"
        )
    if upd.codec != t.codec:
        raise InvalidUpdate(
            "wrong_codec", f"{upd.device}: codec {upd.codec!r}, round asks {t.codec!r}"
        )
    if not t.asks(upd.device):
        raise InvalidUpdate("not_selected", f"{upd.device} was not asked in round {t.round}")
    if upd.device in rnd.counted:
        raise InvalidUpdate("duplicate", f"{upd.device} already counted in round {t.round}")
    if keyring is not None:
        # Signed over (device, round, nonce, base, samples, codec, sha256(delta)): checked
        # before the delta is decompressed, so a forged update costs one hash.
        if not upd.signature:
            raise InvalidUpdate("unsigned", f"{upd.device}: update carries no signature")
        keyring.check_update(upd.device, upd.digest(), upd.signature)
    if t.mask or t.trainable is not None:
        # The task's own mask and trainable tensors (checked against the model when the round
        # opened): the delta must carry exactly what they leave live (else ``bad_tensor``);
        # frozen tensors fold as zeros.
        keep = t.mask.keep(spec) if t.mask else {}
        sent = live_spec(spec, keep, t.trainable)
        values = parse_codec(upd.codec).decode(upd.delta, sent, limits)
        delta = scatter(values, keep, spec)
    else:
        delta = parse_codec(upd.codec).decode(upd.delta, spec, limits)
    n = min(upd.num_samples, max_num_samples)
    w = n if max_weight is None else min(n, max_weight)
    return Accepted(upd, delta, n, clamped=w != upd.num_samples, weight=w)
