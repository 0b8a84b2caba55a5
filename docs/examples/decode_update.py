"""Decode a fedge ModelUpdate payload (wire contract v1) with msgpack and numpy alone.

    python decode_update.py UPDATE.bin [MODEL_SPEC.json]

UPDATE.bin is the raw MQTT payload received on ``fedge/<fleet>/update/<device>``.
MODEL_SPEC.json, if given, maps tensor names to shapes (``{"linear.weight": [2, 2], ...}``)
and is checked the way the aggregator checks a delta. ``zstandard`` is imported only for
``+zstd`` codecs. No fedge import: this is the contract of docs/protocol.md, written out.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import msgpack
import numpy as np

UPDATE_KEYS = {
    "v", "kind", "device", "round", "base_version", "update_id",
    "nonce", "num_samples", "codec", "delta", "metrics",
}  # fmt: skip
DTYPE_OF_CODEC = {"fp32": "<f4", "fp16": "<f2"}
MAX_DECOMPRESSED = 256 * 1024 * 1024


def unzstd(frame: bytes, cap: int = MAX_DECOMPRESSED) -> bytes:
    import zstandard  # only needed for "+zstd" codecs

    declared = zstandard.frame_content_size(frame)  # -1 when the frame does not declare it
    if declared < 0:
        raise ValueError("zstd frame does not declare its content size")
    if declared > cap:
        raise ValueError(f"zstd frame declares {declared} bytes, limit {cap}")
    with zstandard.ZstdDecompressor().stream_reader(frame, read_across_frames=False) as r:
        out = r.read(cap + 1)
    if len(out) != declared:
        raise ValueError(f"zstd frame gave {len(out)} bytes, declared {declared}")
    return out


def decode_delta(codec: str, blob: bytes) -> dict[str, np.ndarray]:
    """codec blob -> {name: float32 array}; records are [name, dtype, shape, data]."""
    value, _, outer = codec.partition("+")
    if outer not in ("", "zstd") or value not in DTYPE_OF_CODEC:
        raise ValueError(f"unknown codec {codec!r}")
    if outer == "zstd":
        blob = unzstd(blob)
    records = msgpack.unpackb(blob, raw=False)  # raises on trailing bytes
    if not isinstance(records, list):
        raise ValueError("delta must be an array of tensor records")
    out: dict[str, np.ndarray] = {}
    for rec in records:
        name, dtype, shape, data = rec  # exactly 4 fields
        if dtype != DTYPE_OF_CODEC[value]:
            raise ValueError(f"{name}: dtype {dtype!r} does not match codec {codec!r}")
        if name in out:
            raise ValueError(f"{name}: duplicate tensor")
        if len(data) != math.prod(shape) * np.dtype(dtype).itemsize:
            raise ValueError(f"{name}: {len(data)} data bytes for shape {shape}")
        arr = np.frombuffer(data, dtype=dtype).astype(np.float32).reshape(shape)
        if not np.isfinite(arr).all():
            raise ValueError(f"{name}: NaN or Inf")
        out[name] = arr
    return out


def decode_update(payload: bytes) -> dict[str, Any]:
    msg = msgpack.unpackb(payload, raw=False)
    if not isinstance(msg, dict):
        raise ValueError("an envelope is a msgpack map")
    if msg.get("v") != 1 or msg.get("kind") != "update":
        raise ValueError(f"not a v1 update: v={msg.get('v')!r} kind={msg.get('kind')!r}")
    if set(msg) - UPDATE_KEYS:
        raise ValueError(f"unknown keys {sorted(set(msg) - UPDATE_KEYS)}")
    if not isinstance(msg["nonce"], bytes) or not isinstance(msg["delta"], bytes):
        raise ValueError("nonce and delta must be msgpack bin")
    msg["delta"] = decode_delta(msg["codec"], msg["delta"])
    return msg


def main() -> None:
    with open(sys.argv[1], "rb") as f:
        upd = decode_update(f.read())
    print(
        f"device={upd['device']} round={upd['round']} base_version={upd['base_version']} "
        f"update_id={upd['update_id']} nonce={upd['nonce'].hex()} "
        f"num_samples={upd['num_samples']} codec={upd['codec']} metrics={upd.get('metrics')}"
    )
    for name, arr in upd["delta"].items():
        print(f"  {name} {list(arr.shape)} {arr.ravel()[:4].tolist()}")
    if len(sys.argv) > 2:
        with open(sys.argv[2]) as f:
            spec = {k: tuple(v) for k, v in json.load(f).items()}
        got = {k: a.shape for k, a in upd["delta"].items()}
        if got != spec:
            raise SystemExit(f"delta {got} does not match model {spec}")
        print("matches the model spec")


if __name__ == "__main__":
    main()
