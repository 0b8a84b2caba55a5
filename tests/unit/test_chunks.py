"""fedge/chunks.py: splitting and reassembling models, in any arrival order, bounded."""

from __future__ import annotations

import hashlib
import random
from dataclasses import replace

import pytest

from fedge.chunks import Assembler, split_model
from fedge.envelopes import GlobalModel, ModelArch, ModelChunk
from fedge.errors import ProtocolError

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
