"""Published model versions on disk: ``vNNNNNN.onnx`` beside ``vNNNNNN.json`` metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedge.fsutil import atomic_write

__all__ = ["ModelRegistry"]


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
        return sorted(int(p.stem[1:]) for p in self.dir.glob("v*.onnx"))

    def meta(self, version: int) -> dict[str, Any]:
        return json.loads(self.path(version).with_suffix(".json").read_text())
