"""Model patches: the exact arithmetic of the downlink (protocol §5.8, devices §9.8).

A patch takes the weights of version ``v-1`` to those of ``v``. Every device and the
aggregator must reach the same bytes, so both steps are fixed here:

- **Hash of weights** (``weights_sha256``): sha256 over, for each tensor in ascending order
  of its name's UTF-8 bytes, ``u16 len(name) big-endian | name (UTF-8) | the values as
  little-endian IEEE 754 binary32 in C order``. Shapes are fixed by the model, so they are
  not hashed.
- **Apply** (``apply_patch``): decode ``delta`` with the patch's codec (``fedge.codecs``) to
  float32 (its blob size capped by the codec's ``max_blob_bytes`` for the model *before* any
  decompression), then per tensor ``new = float32(base + decoded)``: one binary32 addition
  per element, round to nearest even, no fused or wider arithmetic, no reduction. The result
  must be finite and its hash must equal the patch's ``sha256``.

The aggregator makes each patch against the weights devices hold (its "device view") with
``make_patch``: ``delta = target - view`` (binary32), encoded, then *decoded again* and
added with ``apply``: the view it keeps is byte for byte what devices compute. Whatever the
codec dropped stays in ``target - view`` and goes out with the next patch (server-side error
feedback).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import replace

import numpy as np

from fedge.codecs import parse_codec
from fedge.envelopes.patch import ModelPatch
from fedge.errors import InvalidValue, ProtocolError
from fedge.identity import SigningKey, VerifyKey
from fedge.limits import DEFAULT_LIMITS, Limits
from fedge.tensors import TensorSpec, spec_of

__all__ = ["add_delta", "apply_patch", "make_patch", "verify_patch", "weights_sha256"]

Weights = Mapping[str, np.ndarray]


def weights_sha256(weights: Weights) -> bytes:
    """The 32-byte sha256 of ``weights`` (the layout in the module docstring)."""
    h = hashlib.sha256()
    for name in sorted(weights, key=lambda n: n.encode("utf-8")):
        raw = name.encode("utf-8")
        h.update(struct.pack(">H", len(raw)))
        h.update(raw)
        h.update(np.ascontiguousarray(weights[name], dtype="<f4").tobytes(order="C"))
    return h.digest()


def add_delta(base: Weights, decoded: Weights) -> dict[str, np.ndarray]:
    """``float32(base + decoded)`` per tensor, in ``base``'s order."""
    out = {}
    for name, b in base.items():
        out[name] = np.add(
            np.asarray(b, dtype=np.float32), np.asarray(decoded[name], dtype=np.float32)
        )
    return out


def _decode(patch: ModelPatch, spec: TensorSpec, limits: Limits) -> dict[str, np.ndarray]:
    try:
        codec = parse_codec(patch.codec)
    except InvalidValue as e:
        raise ProtocolError("schema", f"patch v{patch.to_version}: {e}") from None
    cap = codec.max_blob_bytes(spec)
    if len(patch.delta) > cap:
        raise ProtocolError(
            "too_large", f"patch v{patch.to_version}: {len(patch.delta)} bytes, at most {cap}"
        )
    return codec.decode(patch.delta, spec, limits)


def verify_patch(patch: ModelPatch, key: VerifyKey | None) -> None:
    """``ProtocolError("bad_signature")`` unless ``key`` is None or signed ``patch``."""
    if key is not None and not key.verify(patch.digest(), patch.signature):
        raise ProtocolError(
            "bad_signature", f"refused patch v{patch.to_version}: missing or bad signature"
        )


def apply_patch(
    base: Weights, patch: ModelPatch, limits: Limits = DEFAULT_LIMITS
) -> dict[str, np.ndarray]:
    """The weights of ``patch.to_version`` from ``base`` (those of ``from_version``).

    ``ProtocolError``: a blob too large or malformed, ``bad_hash`` when the result does not
    match (``base`` is not the weights the patch was made for, or the patch is corrupt). The
    signature is the caller's to check first (``verify_patch``).
    """
    new = add_delta(base, _decode(patch, spec_of(base), limits))
    if not all(np.isfinite(a).all() for a in new.values()):
        raise ProtocolError("non_finite", f"patch v{patch.to_version}: result not finite")
    if weights_sha256(new) != patch.sha256:
        raise ProtocolError("bad_hash", f"patch v{patch.to_version}: result hash differs")
    return new


def make_patch(
    view: Weights,
    target: Weights,
    *,
    from_version: int,
    codec: str,
    retained_from: int,
    signing_key: SigningKey | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[ModelPatch, dict[str, np.ndarray]]:
    """The patch from ``view`` (version ``from_version``) towards ``target``, and the new view
    (exactly what a device that applies it holds)."""
    c = parse_codec(codec)
    delta = {k: np.subtract(target[k], view[k], dtype=np.float32) for k in view}
    blob = c.encode(delta, rng)
    spec = spec_of(view)
    big = Limits(
        max_payload_bytes=max(len(blob), 1), max_decompressed_bytes=c.max_blob_bytes(spec) + 1
    )
    new_view = add_delta(view, c.decode(blob, spec, big))
    patch = ModelPatch(
        from_version=from_version,
        to_version=from_version + 1,
        codec=c.name,
        delta=blob,
        sha256=weights_sha256(new_view),
        retained_from=retained_from,
    )
    if signing_key is not None:
        patch = replace(patch, signature=signing_key.sign(patch.digest()))
    return patch, new_view
