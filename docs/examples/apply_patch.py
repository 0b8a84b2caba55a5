"""Apply a fedge ModelPatch (wire contract v1, protocol section 5.8) with msgpack and numpy.

    python apply_patch.py PATCH.bin WEIGHTS.npz OUT.npz [--pubkey HEX]

PATCH.bin is the raw MQTT payload received on ``fedge/<fleet>/model/patch/<slot>``; WEIGHTS.npz
holds the float32 weights of version ``from_version`` by tensor name (as read from the ONNX
initializers). OUT.npz gets the weights of ``to_version`` after the result hash checked out.
``--pubkey`` (the aggregator's raw 32-byte Ed25519 public key, hex) verifies the signature
with ``cryptography`` first. The delta is decoded by ``decode_update.decode_delta`` beside
this file (every codec). No fedge import: this is docs/protocol.md written out.
"""

from __future__ import annotations

import argparse
import hashlib
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from decode_update import decode_delta

PATCH_KEYS = {
    "v", "kind", "from_version", "to_version", "codec", "delta", "sha256", "retained_from",
    "signature",
}  # fmt: skip


def weights_sha256(weights: Mapping[str, np.ndarray]) -> bytes:
    """sha256 over the tensors in UTF-8 name order: u16 BE len(name) | name | LE binary32."""
    h = hashlib.sha256()
    for name in sorted(weights, key=lambda n: n.encode("utf-8")):
        raw = name.encode("utf-8")
        h.update(struct.pack(">H", len(raw)) + raw)
        h.update(np.ascontiguousarray(weights[name], dtype="<f4").tobytes())
    return h.digest()


def signed_digest(msg: dict[str, Any]) -> bytes:
    """The bytes the aggregator signed (protocol 5.8.1)."""
    codec = msg["codec"].encode("ascii")
    return b"".join(
        (
            b"fedge.patch.v1\x00\x00",
            struct.pack(">II", msg["from_version"], msg["to_version"]),
            bytes([len(codec)]) + codec,
            msg["sha256"],
            hashlib.sha256(msg["delta"]).digest(),
            struct.pack(">I", msg["retained_from"]),
        )
    )


def decode_patch(payload: bytes) -> dict[str, Any]:
    msg = msgpack.unpackb(payload, raw=False)
    if not isinstance(msg, dict) or msg.get("v") != 1 or msg.get("kind") != "patch":
        raise ValueError("not a v1 patch envelope")
    if set(msg) - PATCH_KEYS:
        raise ValueError(f"unknown keys {sorted(set(msg) - PATCH_KEYS)}")
    if msg.get("to_version") is None:  # optional: absent means from_version + 1
        msg["to_version"] = msg["from_version"] + 1
    if not isinstance(msg["sha256"], bytes) or len(msg["sha256"]) != 32:
        raise ValueError("sha256 must be 32 bytes of msgpack bin")
    if not msg["from_version"] < msg["to_version"]:
        raise ValueError("from_version must be below to_version")
    msg["signature"] = msg.get("signature") or b""
    return msg


def apply(weights: Mapping[str, np.ndarray], msg: dict[str, Any]) -> dict[str, np.ndarray]:
    """float32(base + decoded) per tensor; refuses a result whose hash differs."""
    delta = decode_delta(msg["codec"], msg["delta"])
    if set(delta) != set(weights):
        raise ValueError(f"patch tensors {sorted(delta)} != model tensors {sorted(weights)}")
    out = {k: np.add(np.asarray(w, np.float32), delta[k]) for k, w in weights.items()}
    if weights_sha256(out) != msg["sha256"]:
        raise ValueError("result hash differs: resynchronise with the full model")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("patch", type=Path)
    p.add_argument("weights", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--pubkey", help="the aggregator's raw Ed25519 public key, 64 hex digits")
    args = p.parse_args()
    msg = decode_patch(args.patch.read_bytes())
    if args.pubkey:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(args.pubkey))
        try:
            key.verify(msg["signature"], signed_digest(msg))
        except InvalidSignature:
            raise SystemExit("signature does NOT verify") from None
    with np.load(args.weights) as z:
        weights = {k: z[k] for k in z.files}
    out = apply(weights, msg)
    np.savez(args.out, **out)  # type: ignore[arg-type]
    print(f"v{msg['from_version']} -> v{msg['to_version']} ({msg['codec']}): hash ok")


if __name__ == "__main__":
    main()
