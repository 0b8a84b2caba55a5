"""fedge/chunks.py: splitting and reassembling models, in any arrival order, bounded; the
receiver in front of it that refuses models older than the held one or unsigned."""

from __future__ import annotations

import hashlib
import random
from dataclasses import replace

import pytest

from fedge.chunks import Assembler, ModelReceiver, split_model
from fedge.envelopes import GlobalModel, ModelArch, ModelChunk
from fedge.errors import ProtocolError
from fedge.identity import SigningKey
from fedge.limits import DEFAULT_LIMITS
from fedge.topics import Topics

ARCH = ModelArch("mlp", 64, 10)


def manifest_and_chunks(data: bytes, version: int, k: int) -> tuple[GlobalModel, list[ModelChunk]]:
    sha = hashlib.sha256(data).hexdigest()
    chunks = split_model(version, data, sha, k)
    m = GlobalModel(version, ARCH, b"", sha, 1.0, {}, chunks=len(chunks), size=len(data))
    return m, chunks


@pytest.mark.parametrize("seed", range(5))
def test_any_arrival_order_reassembles_exactly(seed: int) -> None:
    data = random.Random(seed).randbytes(10_000)
    m, chunks = manifest_and_chunks(data, 3, 1024)
    msgs: list[object] = [m, *chunks]
    random.Random(seed).shuffle(msgs)
    asm = Assembler(max_bytes=1 << 20)

    done = [
        asm.offer_manifest(x) if isinstance(x, GlobalModel) else asm.offer_chunk(x)  # type: ignore[arg-type]
        for x in msgs
    ]

    complete = [d for d in done if d is not None]
    assert len(complete) == 1
    assert complete[0].onnx == data
    assert complete[0].version == 3
    assert not complete[0].is_manifest
    assert len(chunks) == 10


def test_manifest_and_chunks_survive_the_wire() -> None:
    data = bytes(range(256)) * 50
    m, chunks = manifest_and_chunks(data, 1, 4000)
    asm = Assembler(max_bytes=1 << 20)
    for c in chunks:
        assert asm.offer_chunk(ModelChunk.from_bytes(c.to_bytes())) is None

    full = asm.offer_manifest(GlobalModel.from_bytes(m.to_bytes()))

    assert full is not None
    assert full.onnx == data


def test_newer_version_replaces_partial_older_one() -> None:
    old, old_chunks = manifest_and_chunks(b"a" * 5000, 1, 1000)
    new, new_chunks = manifest_and_chunks(b"b" * 3000, 2, 1000)
    asm = Assembler(max_bytes=1 << 20)
    asm.offer_manifest(old)
    asm.offer_chunk(old_chunks[0])

    for c in new_chunks[:-1]:
        assert asm.offer_chunk(c) is None
    assert asm.offer_chunk(old_chunks[1]) is None  # stale, ignored
    assert asm.offer_manifest(new) is None
    full = asm.offer_chunk(new_chunks[-1])

    assert full is not None
    assert full.onnx == b"b" * 3000


def test_corrupt_chunk_fails_the_hash() -> None:
    m, chunks = manifest_and_chunks(b"x" * 3000, 1, 1000)
    asm = Assembler(max_bytes=1 << 20)
    asm.offer_manifest(m)
    asm.offer_chunk(chunks[0])
    asm.offer_chunk(chunks[1])

    with pytest.raises(ProtocolError) as e:
        asm.offer_chunk(replace(chunks[2], data=b"y" * 1000))
    assert e.value.reason == "bad_hash"


def test_chunks_beyond_the_bound_are_refused() -> None:
    _, chunks = manifest_and_chunks(b"z" * 5000, 1, 1000)
    asm = Assembler(max_bytes=2500)
    asm.offer_chunk(chunks[0])
    asm.offer_chunk(chunks[1])

    with pytest.raises(ProtocolError) as e:
        asm.offer_chunk(chunks[2])
    assert e.value.reason == "too_large"


def test_manifest_must_not_carry_onnx() -> None:
    m, _ = manifest_and_chunks(b"q" * 100, 1, 10)
    bad = replace(m, onnx=b"q" * 100)

    with pytest.raises(ProtocolError) as e:
        GlobalModel.from_bytes(bad.to_bytes())
    assert e.value.reason == "schema"


# --- ModelReceiver: payloads of the model topics in, complete verified models out ----------

TOPICS = Topics("unit")


def inline(data: bytes, version: int, key: SigningKey | None = None) -> GlobalModel:
    m = GlobalModel(version, ARCH, data, hashlib.sha256(data).hexdigest(), 1.0, {})
    return replace(m, signature=key.sign(m.digest())) if key is not None else m


def test_receiver_returns_an_inline_model_and_a_chunked_one() -> None:
    rx = ModelReceiver(TOPICS)
    m1 = inline(b"one" * 10, 1)
    m2, chunks = manifest_and_chunks(b"two" * 1000, 2, 1000)

    got1 = rx.offer(TOPICS.model, m1.to_bytes())
    pending = [rx.offer(TOPICS.model_chunk(c.index), c.to_bytes()) for c in chunks]
    got2 = rx.offer(TOPICS.model, m2.to_bytes())

    assert got1 == m1
    assert pending == [None] * len(chunks)
    assert got2 is not None
    assert got2.onnx == b"two" * 1000
    assert got2.version == 2


def test_receiver_wants_the_model_topics_only() -> None:
    rx = ModelReceiver(TOPICS)

    assert rx.wants(TOPICS.model)
    assert rx.wants(TOPICS.model_chunk(3))
    assert not rx.wants(TOPICS.task)
    assert not rx.wants(TOPICS.receipt("dev-1"))
    assert not rx.wants(TOPICS.model_int8)
    assert rx.offer(TOPICS.model_chunk(0), b"") is None  # a retained chunk being cleared


def test_receiver_never_goes_below_the_held_model() -> None:
    held = inline(b"held", 5)
    rx = ModelReceiver(TOPICS, held=(held.version, held.sha256))

    with pytest.raises(ProtocolError) as e:
        rx.offer(TOPICS.model, inline(b"old", 4).to_bytes())

    assert e.value.reason == "stale_model"
    assert "refused model v4 older than held v5" in str(e.value)
    assert rx.offer(TOPICS.model, held.to_bytes()) is None  # the one held: nothing to do
    same_version = inline(b"held, re-exported", 5)
    assert rx.offer(TOPICS.model, same_version.to_bytes()) == same_version


def test_receiver_floor_moves_only_when_the_caller_holds_a_model() -> None:
    rx = ModelReceiver(TOPICS)
    m3, m2 = inline(b"three", 3), inline(b"two", 2)

    assert rx.offer(TOPICS.model, m3.to_bytes()) == m3
    assert rx.offer(TOPICS.model, m2.to_bytes()) == m2  # m3 was not kept: m2 may still be
    rx.hold(m3.version, m3.sha256)
    with pytest.raises(ProtocolError):
        rx.offer(TOPICS.model, m2.to_bytes())


def test_receiver_with_a_key_wants_the_aggregators_signature() -> None:
    key, other = SigningKey.generate(), SigningKey.generate()
    rx = ModelReceiver(TOPICS, verify_key=key.verify_key)
    good = inline(b"model", 1, key)

    for bad in (inline(b"model", 1), inline(b"model", 1, other)):
        with pytest.raises(ProtocolError) as e:
            rx.offer(TOPICS.model, bad.to_bytes())
        assert e.value.reason == "bad_signature"
        assert "refused model v1: missing or bad signature" in str(e.value)
    assert rx.offer(TOPICS.model, good.to_bytes()) == good


def test_receiver_checks_the_signature_of_a_manifest_before_it_counts() -> None:
    key = SigningKey.generate()
    m, chunks = manifest_and_chunks(b"big" * 1000, 1, 1000)
    rx = ModelReceiver(TOPICS, verify_key=key.verify_key)
    for c in chunks:
        rx.offer(TOPICS.model_chunk(c.index), c.to_bytes())

    with pytest.raises(ProtocolError) as e:
        rx.offer(TOPICS.model, m.to_bytes())
    assert e.value.reason == "bad_signature"

    # The forged manifest changed nothing: the chunks held still complete the signed one.
    full = rx.offer(TOPICS.model, replace(m, signature=key.sign(m.digest())).to_bytes())
    assert full is not None
    assert full.onnx == b"big" * 1000


def signed_manifest(
    data: bytes, version: int, k: int, key: SigningKey
) -> tuple[GlobalModel, list[ModelChunk]]:
    m, chunks = manifest_and_chunks(data, version, k)
    return replace(m, signature=key.sign(m.digest())), chunks


def test_a_forged_newer_chunk_or_manifest_does_not_stall_the_assembler() -> None:
    key = SigningKey.generate()
    asm = Assembler(1 << 20, verify_key=key.verify_key)
    forged_chunk = ModelChunk(2**31, 0, 1, "f" * 64, b"x")
    forged_manifest, _ = manifest_and_chunks(b"evil", 2**31, 10)

    assert asm.offer_chunk(forged_chunk) is None  # held aside, version unchanged
    with pytest.raises(ProtocolError) as e:
        asm.offer_manifest(forged_manifest)
    m5, c5 = signed_manifest(b"five" * 500, 5, 700, key)
    m6, c6 = signed_manifest(b"six!" * 500, 6, 700, key)
    got5 = [asm.offer_manifest(m5), *(asm.offer_chunk(c) for c in c5)]
    got6 = [*(asm.offer_chunk(c) for c in c6), asm.offer_manifest(m6)]

    assert e.value.reason == "bad_signature"
    assert got5[-1] is not None
    assert got5[-1].onnx == b"five" * 500
    assert got6[-1] is not None
    assert got6[-1].onnx == b"six!" * 500
    assert asm.buffered_bytes <= 1  # the forged chunk, at most


def test_chunks_before_a_manifest_are_bounded_by_the_last_model_not_max_bytes() -> None:
    key = SigningKey.generate()
    asm = Assembler(1 << 30, verify_key=key.verify_key, first_early=4096, min_early=1024)
    m1, c1 = signed_manifest(b"a" * 3000, 1, 1000, key)
    for c in c1:
        asm.offer_chunk(c)
    assert asm.offer_manifest(m1) is not None  # 3000 B waited for the manifest: within 4096
    reasons = []
    for v in range(2, 40):  # forged chunks of versions no manifest announces
        try:
            asm.offer_chunk(ModelChunk(v, 0, 2, "e" * 64, b"z" * 1000))
        except ProtocolError as e:
            reasons.append(e.reason)
    refused = reasons.count("too_large")

    assert asm.early_cap == 6000  # twice the last model (3000 B), above the floor
    assert asm.buffered_bytes <= 6000
    assert refused == len(reasons) == 38 - 6  # newer than every version held: refused once full
    m2, c2 = signed_manifest(b"b" * 3000, 2, 1000, key)
    done = [asm.offer_manifest(m2), *(asm.offer_chunk(c) for c in c2)]
    assert done[-1] is not None
    assert done[-1].onnx == b"b" * 3000


def test_receiver_bounds_chunks_by_its_limits() -> None:
    _, chunks = manifest_and_chunks(b"z" * 5000, 1, 1000)
    rx = ModelReceiver(TOPICS, replace(DEFAULT_LIMITS, max_model_bytes=2500))
    rx.offer(TOPICS.model_chunk(0), chunks[0].to_bytes())
    rx.offer(TOPICS.model_chunk(1), chunks[1].to_bytes())

    with pytest.raises(ProtocolError) as e:
        rx.offer(TOPICS.model_chunk(2), chunks[2].to_bytes())
    assert e.value.reason == "too_large"


def test_a_full_early_buffer_makes_room_for_a_nearer_version() -> None:
    key = SigningKey.generate()
    asm = Assembler(1 << 30, verify_key=key.verify_key, first_early=4096, min_early=1024)
    for i in range(4):  # forged far-future chunks fill the buffer
        asm.offer_chunk(ModelChunk(2**31, i, 8, "e" * 64, b"z" * 1000))
    m1, c1 = signed_manifest(b"a" * 3000, 1, 1000, key)

    pending = [asm.offer_chunk(c) for c in c1]
    full = asm.offer_manifest(m1)

    assert pending == [None] * 3
    assert full is not None
    assert full.onnx == b"a" * 3000
    assert asm.evicted == 1


def test_a_manifests_size_claim_does_not_widen_the_early_buffer() -> None:
    asm = Assembler(1 << 30, first_early=4096, min_early=1024)  # no key: the demo profile
    m1, c1 = manifest_and_chunks(b"a" * 3000, 1, 1000)
    asm.offer_manifest(m1)
    for c in c1:
        asm.offer_chunk(c)
    huge = replace(manifest_and_chunks(b"x", 2, 1)[0], size=1 << 30, chunks=1 << 20)

    asm.offer_manifest(huge)  # unverifiable here, so taken, but it sizes nothing

    assert asm.early_cap == 6000
