"""Model patches: envelope round trip, bit-exact reconstruction, refusal of forged, unsigned,
oversized and mismatched patches (fedge/patches.py, fedge/envelopes/patch.py)."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import replace

import msgpack
import numpy as np
import pytest

from fedge.envelopes import ModelPatch
from fedge.errors import ProtocolError
from fedge.identity import SigningKey
from fedge.patches import apply_patch, make_patch, verify_patch, weights_sha256


def _weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "fc1.weight": rng.normal(size=(16, 8)).astype(np.float32),
        "fc1.bias": rng.normal(size=(16,)).astype(np.float32),
        "fc2.weight": rng.normal(size=(4, 16)).astype(np.float32),
    }


def test_weights_hash_is_the_documented_layout() -> None:
    w = _weights(0)
    h = hashlib.sha256()
    for name in sorted(w):
        h.update(struct.pack(">H", len(name)) + name.encode() + w[name].astype("<f4").tobytes())
    assert weights_sha256(w) == h.digest()
    # Insertion order does not matter; a single changed bit does.
    assert weights_sha256(dict(reversed(list(w.items())))) == h.digest()
    w2 = {k: v.copy() for k, v in w.items()}
    w2["fc1.bias"].view(np.uint32)[3] ^= 1
    assert weights_sha256(w2) != h.digest()


@pytest.mark.parametrize("codec", ["fp32", "int8+zstd", "topk:0.05+int4+zstd", "fp16"])
def test_device_reconstruction_is_bit_exact_with_the_view(codec: str) -> None:
    key = SigningKey.generate()
    view, target = _weights(0), _weights(1)
    patch, new_view = make_patch(
        view, target, from_version=3, codec=codec, retained_from=0, signing_key=key,
        rng=np.random.default_rng(5),
    )  # fmt: skip
    wire = ModelPatch.from_bytes(patch.to_bytes())
    assert wire == patch
    verify_patch(wire, key.verify_key)
    device = apply_patch(view, wire)
    for k in view:
        assert device[k].dtype == np.float32
        assert device[k].tobytes() == new_view[k].tobytes()
    assert weights_sha256(device) == patch.sha256
    if codec == "fp32":  # view + (target - view) in binary32: within an ulp, not equal
        for k in target:
            np.testing.assert_allclose(device[k], target[k], rtol=0, atol=1e-6)


def test_error_feedback_carries_what_a_patch_did_not_send() -> None:
    """A fixed target reached through a sparse codec: the view converges, not drifts."""
    view, target = _weights(0), _weights(1)
    rng = np.random.default_rng(0)
    errors = []
    for v in range(40):
        _, view = make_patch(
            view, target, from_version=v, codec="topk:0.1+int8", retained_from=0, rng=rng
        )
        errors.append(max(float(np.abs(target[k] - view[k]).max()) for k in target))
    assert errors[-1] < 0.05 * errors[0]


def test_unsigned_or_forged_patch_is_refused() -> None:
    key, other = SigningKey.generate(), SigningKey.generate()
    patch, _ = make_patch(
        _weights(0), _weights(1), from_version=0, codec="int8", retained_from=0, signing_key=key
    )
    with pytest.raises(ProtocolError, match="bad_signature"):
        verify_patch(replace(patch, signature=b""), key.verify_key)
    with pytest.raises(ProtocolError, match="bad_signature"):
        verify_patch(replace(patch, signature=other.sign(patch.digest())), key.verify_key)
    # Any signed field changed (here the result hash, the delta) breaks the signature.
    with pytest.raises(ProtocolError, match="bad_signature"):
        verify_patch(replace(patch, sha256=bytes(32)), key.verify_key)
    with pytest.raises(ProtocolError, match="bad_signature"):
        verify_patch(replace(patch, delta=patch.delta + b"\x00"), key.verify_key)


def test_wrong_base_or_result_hash_is_refused() -> None:
    view = _weights(0)
    patch, _ = make_patch(view, _weights(1), from_version=0, codec="int8", retained_from=0)
    with pytest.raises(ProtocolError, match="bad_hash"):
        apply_patch(_weights(2), patch)
    with pytest.raises(ProtocolError, match="bad_hash"):
        apply_patch(view, replace(patch, sha256=bytes(32)))


def test_oversized_delta_is_refused_before_decompressing() -> None:
    view = _weights(0)
    patch, _ = make_patch(view, _weights(1), from_version=0, codec="int8+zstd", retained_from=0)
    bomb = replace(patch, delta=b"\x28\xb5\x2f\xfd" + b"\x00" * 200_000)
    with pytest.raises(ProtocolError, match="too_large"):
        apply_patch(view, bomb)


@pytest.mark.parametrize(
    "change",
    [
        {"to_version": 3},  # not after from_version
        {"retained_from": 4},  # after from_version
        {"sha256": b"short"},
    ],
)
def test_envelope_refuses_inconsistent_fields(change: dict[str, object]) -> None:
    patch, _ = make_patch(_weights(0), _weights(1), from_version=3, codec="fp16", retained_from=1)
    with pytest.raises(ProtocolError):
        ModelPatch.from_bytes(replace(patch, **change).to_bytes())  # type: ignore[arg-type]


def test_to_version_is_sent_only_when_it_is_not_the_next_version() -> None:
    """fedge's patches make from_version + 1 and leave ``to_version`` out (protocol §5.9)."""
    # Arrange
    key = SigningKey.generate()
    patch, _ = make_patch(
        _weights(0), _weights(1), from_version=3, codec="fp16", retained_from=1, signing_key=key
    )
    skip = replace(patch, to_version=5)

    # Act
    back, back_skip = (ModelPatch.from_bytes(p.to_bytes()) for p in (patch, skip))

    # Assert
    assert "to_version" not in msgpack.unpackb(patch.to_bytes())
    assert msgpack.unpackb(skip.to_bytes())["to_version"] == 5
    assert (back, back_skip) == (patch, skip)
    key.verify_key.verify(back.digest(), back.signature)
