"""Decode a fedge ModelUpdate payload (wire contract v1) with msgpack and numpy alone.

    python decode_update.py UPDATE.bin [MODEL_SPEC.json] [--pubkey HEX]

UPDATE.bin is the raw MQTT payload received on ``fedge/<fleet>/update/<device>``.
MODEL_SPEC.json, if given, maps tensor names to shapes (``{"linear.weight": [2, 2], ...}``)
and is checked the way the aggregator checks a delta. ``--pubkey`` (the device's raw 32-byte
Ed25519 public key, hex) verifies the signature with ``cryptography``. ``zstandard`` is
imported only for ``+zstd`` codecs. No fedge import: this is the contract of
docs/protocol.md (sections 5.3, 6 and 8.3), written out, for every codec:
``[topk:F+](fp32|fp16|int8|int4)[+zstd]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import struct
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

UPDATE_KEYS = {
    "v", "kind", "device", "round", "base_version", "update_id", "nonce",
    "num_samples", "codec", "delta", "metrics", "signature", "calib",
}  # fmt: skip
VALUE_TAGS = {"fp32": "<f4", "fp16": "<f2", "int8": "q8", "int4": "q4"}
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


def parse_codec(codec: str) -> tuple[float | None, str, bool]:
    """'topk:0.03+int4+zstd' -> (0.03, 'int4', True)."""
    parts = codec.split("+")
    zstd = parts[-1] == "zstd"
    parts = parts[:-1] if zstd else parts
    fraction = None
    if parts and parts[0].startswith("topk:"):
        fraction = float(parts.pop(0)[5:])
        parts = parts or ["fp32"]
    if len(parts) != 1 or parts[0] not in VALUE_TAGS:
        raise ValueError(f"unknown codec {codec!r}")
    return fraction, parts[0], zstd


def channels(shape: list[int]) -> int:
    return shape[0] if len(shape) >= 2 else 1


def decode_values(tag: str, fields: list[Any], shape: list[int], what: str) -> np.ndarray:
    """The value fields of a record (dense or the kept entries of a topk one) -> float32."""
    n = math.prod(shape)
    if tag in ("<f4", "<f2"):
        (data,) = fields
        if len(data) != n * np.dtype(tag).itemsize:
            raise ValueError(f"{what}: {len(data)} data bytes for {n} values")
        return np.frombuffer(data, dtype=tag).astype(np.float32).reshape(shape)
    scales_raw, data = fields
    c = channels(shape)
    if len(scales_raw) != 4 * c:
        raise ValueError(f"{what}: {len(scales_raw)} scale bytes, expected {4 * c}")
    scales = np.frombuffer(scales_raw, dtype="<f4")
    if not (np.isfinite(scales).all() and (scales >= 0).all()):
        raise ValueError(f"{what}: scales must be finite and >= 0 (bad_scale)")
    raw = np.frombuffer(data, dtype=np.uint8)
    if tag == "q8":
        if len(raw) != n:
            raise ValueError(f"{what}: {len(raw)} int8 codes for {n} values")
        q = raw.view(np.int8)
        if (q == -128).any():
            raise ValueError(f"{what}: int8 code -128 is not allowed")
    else:
        if len(raw) != (n + 1) // 2:
            raise ValueError(f"{what}: {len(raw)} int4 bytes for {n} values")
        nib = np.empty(2 * len(raw), dtype=np.uint8)
        nib[0::2], nib[1::2] = raw & 0x0F, raw >> 4  # low nibble first
        if len(nib) > n and nib[-1] != 0:
            raise ValueError(f"{what}: int4 padding nibble must be 0")
        nib = nib[:n]
        if (nib == 8).any():
            raise ValueError(f"{what}: int4 code -8 is not allowed")
        q = nib.astype(np.int8) - np.where(nib >= 8, 16, 0).astype(np.int8)
    rows = q.astype(np.float32).reshape(c, n // c if c else 0) * scales[:, None]
    return rows.reshape(shape)


def decode_gaps(buf: bytes, k: int, n: int, what: str) -> np.ndarray:
    """k unsigned LEB128 gaps (idx[-1] = -1) -> strictly increasing indices < n."""
    longest = max(1, math.ceil(n.bit_length() / 7))
    idx, pos, prev = [], 0, -1
    while pos < len(buf):
        gap, shift, start = 0, 0, pos
        while True:
            if pos >= len(buf):
                raise ValueError(f"{what}: index varints truncated")
            b = buf[pos]
            pos += 1
            gap |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        size = pos - start
        if size > longest or (size > 1 and buf[pos - 1] == 0):
            raise ValueError(f"{what}: index varint too long or not minimal")
        if gap == 0:
            raise ValueError(f"{what}: duplicate index (gap 0)")
        prev += gap
        idx.append(prev)
    if len(idx) != k:
        raise ValueError(f"{what}: {len(idx)} indices, record declares k={k}")
    if idx and idx[-1] >= n:
        raise ValueError(f"{what}: index {idx[-1]} out of range for {n} elements")
    return np.asarray(idx, dtype=np.int64)


def decode_record(rec: list[Any], fraction: float | None, value: str) -> tuple[str, np.ndarray]:
    vtag = VALUE_TAGS[value]
    nvals = 1 if vtag.startswith("<") else 2
    name, tag, shape = rec[0], rec[1], rec[2]
    if fraction is None:  # dense: [name, tag, shape, *value fields]
        if len(rec) != 3 + nvals or tag != vtag:
            raise ValueError(f"{name}: expected a {3 + nvals}-field {vtag!r} record")
        return name, decode_values(tag, rec[3:], shape, name)
    # sparse: [name, "topk", shape, k, indices, vtag, *value fields]
    if len(rec) != 6 + nvals or tag != "topk" or rec[5] != vtag:
        raise ValueError(f"{name}: expected a {6 + nvals}-field 'topk' record of {vtag!r}")
    k, indices = rec[3], rec[4]
    n = math.prod(shape)
    if not 0 <= k <= n:
        raise ValueError(f"{name}: k={k} outside [0, {n}] (bad_count)")
    idx = decode_gaps(indices, k, n, name)
    out = np.zeros(n, dtype=np.float32)
    out[idx] = decode_values(vtag, rec[6:], [k], name)
    return name, out.reshape(shape)


def decode_delta(codec: str, blob: bytes) -> dict[str, np.ndarray]:
    """codec blob -> {name: float32 array}."""
    fraction, value, zstd = parse_codec(codec)
    if zstd:
        blob = unzstd(blob)
    records = msgpack.unpackb(blob, raw=False)  # raises on trailing bytes
    if not isinstance(records, list):
        raise ValueError("delta must be an array of tensor records")
    out: dict[str, np.ndarray] = {}
    for rec in records:
        name, arr = decode_record(rec, fraction, value)
        if name in out:
            raise ValueError(f"{name}: duplicate tensor")
        if not np.isfinite(arr).all():
            raise ValueError(f"{name}: NaN or Inf")
        out[name] = arr
    return out


def calib_block(calib: dict[str, Any]) -> bytes:
    """The calibration ranges as signed: u16 count, then per name in UTF-8 byte order
    u16 length, name, f64 min, f64 max (big-endian)."""
    named = sorted((name.encode("utf-8"), pair) for name, pair in calib.items())
    parts = [struct.pack(">H", len(named))]
    for name, (low, high) in named:
        parts.append(struct.pack(">H", len(name)) + name + struct.pack(">dd", low, high))
    return b"".join(parts)


def signed_digest(msg: dict[str, Any]) -> bytes:
    """The bytes the device signed (docs/protocol.md 5.3.1; fedge/identity.py)."""
    dev, codec = msg["device"].encode("ascii"), msg["codec"].encode("ascii")
    return b"".join(
        (
            b"fedge.update.v2\x00",
            bytes([len(dev)]) + dev,
            struct.pack(">IIQ", msg["round"], msg["base_version"], msg["num_samples"]),
            bytes([len(codec)]) + codec,
            bytes([len(msg["nonce"])]) + msg["nonce"],
            hashlib.sha256(msg["delta"]).digest(),
            hashlib.sha256(calib_block(msg["calib"])).digest(),
        )
    )


def decode_update(payload: bytes) -> dict[str, Any]:
    msg = msgpack.unpackb(payload, raw=False)
    if not isinstance(msg, dict):
        raise ValueError("an envelope is a msgpack map")
    if msg.get("v") != 1 or msg.get("kind") != "update":
        raise ValueError(f"not a v1 update: v={msg.get('v')!r} kind={msg.get('kind')!r}")
    if set(msg) - UPDATE_KEYS:
        raise ValueError(f"unknown keys {sorted(set(msg) - UPDATE_KEYS)}")
    if not isinstance(msg["nonce"], bytes) or len(msg["nonce"]) != 16:
        raise ValueError("nonce must be 16 bytes of msgpack bin")
    if not isinstance(msg["delta"], bytes):
        raise ValueError("delta must be msgpack bin")
    msg["signature"] = msg.get("signature") or b""
    msg["calib"] = msg.get("calib") or {}
    msg["digest"] = signed_digest(msg)
    msg["delta_blob"] = msg["delta"]
    msg["delta"] = decode_delta(msg["codec"], msg["delta"])
    return msg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("update", type=Path)
    p.add_argument("spec", type=Path, nargs="?")
    p.add_argument("--pubkey", help="the device's raw Ed25519 public key, 64 hex digits")
    args = p.parse_args()
    upd = decode_update(args.update.read_bytes())
    print(
        f"device={upd['device']} round={upd['round']} base_version={upd['base_version']} "
        f"update_id={upd['update_id']} nonce={upd['nonce'].hex()} "
        f"num_samples={upd['num_samples']} codec={upd['codec']} metrics={upd.get('metrics')}"
    )
    print(f"  signature={upd['signature'].hex() or '(none)'} calib={upd['calib']}")
    for name, arr in upd["delta"].items():
        print(f"  {name} {list(arr.shape)} {arr.ravel()[:4].tolist()}")
    if args.pubkey:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(args.pubkey))
        try:
            key.verify(upd["signature"], upd["digest"])
        except InvalidSignature:
            raise SystemExit("signature does NOT verify") from None
        print("signature verifies")
    if args.spec:
        spec = {k: tuple(v) for k, v in json.loads(args.spec.read_text()).items()}
        got = {k: a.shape for k, a in upd["delta"].items()}
        if got != spec:
            raise SystemExit(f"delta {got} does not match model {spec}")
        print("matches the model spec")


if __name__ == "__main__":
    main()
