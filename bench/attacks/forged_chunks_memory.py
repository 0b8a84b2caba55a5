"""A device's memory under issue 17's forged-chunk attack (item 2).

A ``ModelReceiver`` holding a 43 kB chunked model (v1) is offered thirty forged 15 MiB chunks
of version 2^31, each decoded from its payload as on the wire; prints the peak RSS and what
the receiver holds. ``--module PATH`` runs it against another ``fedge/chunks.py`` (e.g. the
one before the fix, from ``git show <commit>:fedge/chunks.py``)::

    PYTHONPATH=. .venv/bin/python bench/attacks/forged_chunks_memory.py [--module PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import resource
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fedge.envelopes import GlobalModel, ModelArch, ModelChunk  # noqa: E402
from fedge.errors import ProtocolError  # noqa: E402
from fedge.topics import Topics  # noqa: E402


def load(path: str | None) -> ModuleType:
    if path is None:
        import fedge.chunks

        return fedge.chunks
    spec = importlib.util.spec_from_file_location("chunks_under_test", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--module", default=None)
    m = load(p.parse_args().module)
    topics = Topics("f")
    rx = m.ModelReceiver(topics)
    data = bytes(range(256)) * 168
    sha = hashlib.sha256(data).hexdigest()
    chunks = m.split_model(1, data, sha, 8192)
    arch = ModelArch("mlp", 64, 10)
    manifest = GlobalModel(1, arch, b"", sha, 1.0, {}, chunks=len(chunks), size=len(data))
    rx.offer(topics.model, manifest.to_bytes())
    got = [rx.offer(topics.model_chunk(c.index), c.to_bytes()) for c in chunks][-1]
    rx.hold(1, sha)
    before, refused = peak_mib(), 0
    for i in range(30):
        payload = ModelChunk(2**31, i, 2**20, "f" * 64, bytes([i]) * (15 << 20)).to_bytes()
        try:
            rx.offer(topics.model_chunk(i), payload)
        except ProtocolError:
            refused += 1
        del payload
    asm = rx._assembler
    held = asm._bytes + getattr(asm, "_early_bytes", 0)
    print(
        f"peak RSS {before:.0f} -> {peak_mib():.0f} MiB, held {held} bytes, "
        f"refused {refused}/30, v1 assembled: {got is not None}"
    )


if __name__ == "__main__":
    main()
