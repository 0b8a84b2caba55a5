"""Prints the byte examples of docs/protocol.md §16 from fedge's own encoder (fixed keys and
seeds), so a device written in another language can check each step against them.
``tests/unit/test_secagg_docs.py`` checks that protocol.md carries exactly this output.

    python docs/examples/secagg_bytes.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fedge.identity import SigningKey
from fedge.secagg import shamir
from fedge.secagg.crypto import PAIR_INFO, SHARE_INFO, KeyPair, agree, seal_share
from fedge.secagg.messages import MaskedInput, Signed
from fedge.secagg.prg import PRG_INFO, expand, hkdf
from fedge.secagg.ring import RingSpec, pack_bits


def examples() -> str:
    out: list[str] = []
    say = out.append
    ring = RingSpec(value_bits=8, headroom_bits=2, clip=0.5, weight_cap=100)
    say(f"ring: b=8 h=2 B={ring.bits} L={ring.levels} clip=0.5 W=100")
    q = np.array([32, -64, 13, 64], np.int64)  # SR(w x / c L) for w=0.5, x=(.25,-.5,.1), and w L
    elems = (q % ring.modulus).astype(np.uint64)
    say(f"signed values {q.tolist()} -> ring elements {elems.tolist()}")
    say(f"packed ({ring.packed_bytes(4)} bytes): {pack_bits(elems, ring.bits).hex()}")
    seed = bytes(range(32))
    say(f"prg seed 000102..1f: key = HKDF(seed, info={PRG_INFO.decode()!r}) = "
        f"{hkdf(seed, PRG_INFO).hex()}")  # fmt: skip
    say(f"prg first 4 elements at B=10: {expand(seed, 4, 10).tolist()}")
    a, b = KeyPair.from_private(bytes([1]) * 32), KeyPair.from_private(bytes([2]) * 32)
    nonce = bytes(16)
    say(f"X25519 private 01*32 -> public {a.public.hex()}")
    say(f"X25519 private 02*32 -> public {b.public.hex()}")
    say(f"pair seed (salt 00*16, info {PAIR_INFO.decode()!r}): "
        f"{agree(a.private, b.public, nonce, PAIR_INFO).hex()}")  # fmt: skip
    key = agree(a.private, b.public, nonce, SHARE_INFO)
    say(f"share key (info {SHARE_INFO.decode()!r}): {key.hex()}")
    share = shamir.encode_share(3, 12345) + shamir.encode_share(3, 67890)
    say(f"plain shares x=3 (35 + 35 bytes): {share.hex()}")
    sealed = seal_share(key, 7, "dev-a", "dev-b", share)
    say(f"sealed dev-a -> dev-b, round 7 ({len(sealed)} bytes): {sealed.hex()}")
    sk = SigningKey.from_bytes(bytes([9]) * 32)
    msg = Signed.make(MaskedInput(7, "dev-a", 4, pack_bits(elems, ring.bits)), sk)
    say(f"Ed25519 private 09*32, public {sk.verify_key.to_bytes().hex()}")
    say(f"masked input body ({len(msg.body)} bytes): {msg.body.hex()}")
    say(f"masked input message ({len(msg.to_bytes())} bytes): {msg.to_bytes().hex()}")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(examples(), end="")
