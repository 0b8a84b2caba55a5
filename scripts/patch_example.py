"""Print the byte example of docs/protocol.md section 5.8 from fedge's own encoder.

    PYTHONPATH=. python scripts/patch_example.py

A 2x2 ``logreg`` at version 6 (the weights of the update example, section 5.3.2) patched to
version 7 with ``topk:0.5+fp32``, signed with the RFC 8032 test-2 key; then decoded back and
applied, and checked against docs/examples/apply_patch.py (msgpack + numpy only).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "docs" / "examples"))

from apply_patch import apply, decode_patch  # noqa: E402

from fedge.envelopes import ModelPatch  # noqa: E402
from fedge.identity import SigningKey  # noqa: E402
from fedge.patches import apply_patch, make_patch, weights_sha256  # noqa: E402
from fedge.transport.mqtt import publish_packet_size  # noqa: E402

SEED = bytes.fromhex("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb")


def hexdump(b: bytes) -> str:
    return "\n".join(
        f"{i:04x}  " + " ".join(f"{x:02x}" for x in b[i : i + 16]) for i in range(0, len(b), 16)
    )


def main() -> None:
    view = {
        "linear.weight": np.array([[0.5, -0.25], [0.125, 1.0]], np.float32),
        "linear.bias": np.array([0.0, -1.5], np.float32),
    }
    target = {
        "linear.weight": np.array([[0.75, -0.25], [0.125, 0.5]], np.float32),
        "linear.bias": np.array([0.0625, -1.5], np.float32),
    }
    patch, new_view = make_patch(
        view, target, from_version=6, codec="topk:0.5+fp32", retained_from=0,
        signing_key=SigningKey.from_bytes(SEED),
    )  # fmt: skip
    payload = patch.to_bytes()
    assert ModelPatch.from_bytes(payload) == patch
    mine = apply_patch(view, ModelPatch.from_bytes(payload))
    theirs = apply(view, decode_patch(payload))
    assert all(mine[k].tobytes() == theirs[k].tobytes() == new_view[k].tobytes() for k in view)
    print(f"weights_sha256(v6) = {weights_sha256(view).hex()}")
    print(f"delta blob ({len(patch.delta)} bytes):\n{hexdump(patch.delta)}")
    print(f"digest ({len(patch.digest())} bytes):\n{hexdump(patch.digest())}")
    topic = "fedge/demo/model/patch/7"
    size = publish_packet_size(topic, len(payload), 0)
    print(f"patch ({len(payload)} bytes; PUBLISH on {topic} at QoS 0: {size} bytes):")
    print(hexdump(payload))
    for k, v in new_view.items():
        print(f"v7 {k} = {v.tolist()}")
    print(f"sha256 = {patch.sha256.hex()}")


if __name__ == "__main__":
    main()
