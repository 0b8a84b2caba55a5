"""Published model versions on disk: ``vNNNNNN.onnx`` beside ``vNNNNNN.json`` metadata (and
``vNNNNNN.int8.onnx``, the int8 twin, when one is built; ``vNNNNNN.serving.onnx``, the
structurally pruned serving model, when pruning is configured).

The metadata of a version: ``version``, ``sha256`` and ``bytes`` of the ONNX file, ``arch``,
``created``, ``metrics`` (central ``accuracy``/``loss`` when the aggregator has
``eval_data``, else empty), and for every version made by a round ``round`` (its id) and
``devices`` (the ids whose updates were counted into it). A release (``aggregator.rollout``)
serves a version from here, so a rollback is one command while the version is kept
(``keep_versions``). What a release serves of a version (``release``) is its serving model
when it has one (recorded as ``serving_sha256``/``serving_bytes`` in the metadata), else
the trained model."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from fedge.support.fsutil import atomic_write

__all__ = ["ModelRegistry"]

_VERSION_FILE = re.compile(r"v(\d{6,})\.onnx")


class ModelRegistry:
    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, version: int) -> Path:
        return self.dir / f"v{version:06d}.onnx"

    def save(self, version: int, onnx: bytes, meta: dict[str, Any]) -> Path:
        p = self.path(version)
        # Metadata first: versions() lists .onnx files, so a listed version always has its meta.
        atomic_write(p.with_suffix(".json"), json.dumps(meta, indent=1, sort_keys=True).encode())
        atomic_write(p, onnx)
        return p

    def versions(self) -> list[int]:
        """Versions saved, oldest first (int8 twins and other files are not versions)."""
        found = (_VERSION_FILE.fullmatch(p.name) for p in self.dir.glob("v*.onnx"))
        return sorted(int(m.group(1)) for m in found if m)

    def prune(self, keep: int) -> list[int]:
        """Delete all but the newest ``keep`` versions (model, metadata, int8 twin); return
        the versions deleted. The newest is never deleted: ``keep`` must be >= 1."""
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        gone = self.versions()[:-keep]
        for v in gone:
            p = self.path(v)
            # The .onnx first: a crash midway leaves metadata without a listed version.
            twins = (".int8.onnx", ".serving.onnx", ".serving.int8.onnx", ".json")
            for f in (p, *(p.with_suffix(t) for t in twins)):
                f.unlink(missing_ok=True)
        return gone

    def meta(self, version: int) -> dict[str, Any]:
        return json.loads(self.path(version).with_suffix(".json").read_text())

    def load(self, version: int) -> tuple[bytes, dict[str, Any]]:
        """The ONNX bytes and metadata of ``version``; ``KeyError`` if it is not kept, or
        if its bytes do not match the sha256 its metadata recorded."""
        import hashlib

        try:
            onnx = self.path(version).read_bytes()
            meta = self.meta(version)
        except (OSError, ValueError):
            raise KeyError(f"version {version} is not in the registry at {self.dir}") from None
        if hashlib.sha256(onnx).hexdigest() != meta.get("sha256"):
            raise KeyError(f"version {version}: the ONNX file does not match its sha256")
        return onnx, meta

    def save_serving(self, version: int, onnx: bytes) -> Path:
        """Keep ``onnx`` as the serving model of the saved ``version``: the file first, then
        its sha256 in the metadata (a crash between leaves the version releasing its trained
        model, never a file that does not match)."""
        import hashlib

        p = self.path(version).with_suffix(".serving.onnx")
        meta = self.meta(version)
        atomic_write(p, onnx)
        meta |= {"serving_sha256": hashlib.sha256(onnx).hexdigest(), "serving_bytes": len(onnx)}
        meta_path = self.path(version).with_suffix(".json")
        atomic_write(meta_path, json.dumps(meta, indent=1, sort_keys=True).encode())
        return p

    def release(self, version: int) -> tuple[bytes, str, dict[str, Any]]:
        """What a release of ``version`` serves: ``(onnx, sha256, metadata)`` of its serving
        model when it has one (``save_serving``), else of the trained model; ``KeyError``
        as ``load``."""
        import hashlib

        onnx, meta = self.load(version)
        want = meta.get("serving_sha256")
        if want is None:
            return onnx, str(meta["sha256"]), meta
        try:
            serving = self.path(version).with_suffix(".serving.onnx").read_bytes()
        except OSError:
            raise KeyError(f"version {version}: its serving model is missing") from None
        if hashlib.sha256(serving).hexdigest() != want:
            raise KeyError(f"version {version}: the serving ONNX does not match its sha256")
        return serving, str(want), meta
