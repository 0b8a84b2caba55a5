"""``ModelPatch``: the compressed, signed step from one model version's weights to the next's
(protocol §5.8). The arithmetic that applies it is ``fedge.patches``.

Signed bytes (integers big-endian, strings ASCII), Ed25519 by the aggregator's model key::

    patch_digest = b"fedge.patch.v1\\x00\\x00"                16 bytes
                   u32 from_version | u32 to_version
                   u8 len(codec) | codec
                   sha256                                     32: weights hash of the result
                   sha256(delta bytes as sent)                32
                   u32 retained_from
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Self

from fedge.envelopes.common import _MAX_ROUND, SCHEMA_VERSION, SIGNATURE_BYTES, Kind, _open, _opt
from fedge.errors import ProtocolError
from fedge.limits import DEFAULT_LIMITS, Limits
from fedge.wire import pack

__all__ = ["PATCH_TAG", "ModelPatch", "patch_digest"]

PATCH_TAG = b"fedge.patch.v1\x00\x00"


def patch_digest(
    from_version: int,
    to_version: int,
    codec: str,
    sha256: bytes,
    delta_sha256: bytes,
    retained_from: int,
) -> bytes:
    """The exact bytes the aggregator signs for a patch (module docstring)."""
    c = codec.encode("ascii")
    if len(c) > 255 or len(delta_sha256) != 32 or len(sha256) != 32:
        raise ValueError("codec name longer than 255 bytes or a hash not 32 bytes")
    return b"".join(
        (
            PATCH_TAG,
            struct.pack(">II", from_version, to_version),
            bytes([len(c)]),
            c,
            sha256,
            delta_sha256,
            struct.pack(">I", retained_from),
        )
    )


@dataclass(frozen=True)
class ModelPatch:
    """Weights of ``to_version`` = weights of ``from_version`` + decode(``delta``).

    ``sha256`` is ``fedge.patches.weights_sha256`` of the resulting weights (32 raw bytes: a
    patch is small, and its envelope is much of it). ``retained_from``: the oldest
    ``from_version`` whose patch the aggregator still keeps retained when it published this
    one, so a device holding an older version knows at once that only the full model brings
    it up to date.
    """

    from_version: int
    to_version: int
    codec: str
    delta: bytes
    sha256: bytes
    retained_from: int
    signature: bytes = b""  # Ed25519 by the aggregator over digest(); empty when unsigned

    def digest(self) -> bytes:
        return patch_digest(
            self.from_version,
            self.to_version,
            self.codec,
            self.sha256,
            hashlib.sha256(self.delta).digest(),
            self.retained_from,
        )

    def to_bytes(self) -> bytes:
        return pack(
            {
                "v": SCHEMA_VERSION,
                "kind": str(Kind.PATCH),
                "from_version": self.from_version,
                # optional, absent = from_version + 1 (always so in fedge): signed either way
                **(
                    {}
                    if self.to_version == self.from_version + 1
                    else {"to_version": self.to_version}
                ),
                "codec": self.codec,
                "delta": self.delta,
                "sha256": self.sha256,
                "retained_from": self.retained_from,
                "signature": self.signature,
            }
        )

    @classmethod
    def from_bytes(cls, payload: bytes, limits: Limits = DEFAULT_LIMITS) -> Self:
        f = _open(payload, Kind.PATCH, limits)
        start = f.int("from_version", 0, _MAX_ROUND)
        p = cls(
            from_version=start,
            to_version=_opt(f.int("to_version", 1, _MAX_ROUND, optional=True), start + 1),
            codec=f.str("codec"),
            delta=f.bytes("delta", max_len=limits.max_payload_bytes),
            sha256=f.bytes("sha256", max_len=32),
            retained_from=f.int("retained_from", 0, _MAX_ROUND),
            signature=f.bytes("signature", max_len=SIGNATURE_BYTES, optional=True) or b"",
        )
        f.done()
        if p.to_version <= p.from_version or p.retained_from > p.from_version:
            raise ProtocolError(
                "schema", "a patch needs from_version < to_version and retained_from <= from"
            )
        if len(p.sha256) != 32 or len(p.codec) > 255:
            raise ProtocolError("schema", "a patch's sha256 is 32 bytes, its codec <= 255")
        return p
