"""What a device serves, on disk, apart from what it trains on (``edge_agent.store``).

    STATE_DIR/serving/serving.json     the serving and last known good versions (version,
                                       sha256), the release manifest held (its bytes, hex),
                                       the last shadow report, and the history of switches
    STATE_DIR/serving/vNNNNNN.onnx     the ONNX files of the serving and last known good

Each ONNX file is written (atomically) before ``serving.json`` names it, and a file is deleted
only after ``serving.json`` stopped naming it, so a crash anywhere leaves a consistent pair.
``fedge agent predict --state-dir`` reads the serving model from here (``load_serving``) and
checks it against the recorded sha256.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedge.envelopes import ReleaseManifest, ShadowReport
from fedge.errors import ConfigError, ProtocolError
from fedge.support.fsutil import atomic_write

__all__ = ["Held", "ServingStore", "load_serving"]

SERVING_DIR = "serving"
_HISTORY = 200  # switches kept in serving.json


@dataclass(frozen=True)
class Held:
    version: int
    sha256: str


class ServingStore:
    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir) / SERVING_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        raw = _read_json(self.dir / "serving.json")
        self.serving = _held(raw.get("serving"))
        self.lkg = _held(raw.get("lkg"))
        self.manifest: ReleaseManifest | None = None
        if isinstance(raw.get("manifest"), str):
            try:
                self.manifest = ReleaseManifest.from_bytes(bytes.fromhex(raw["manifest"]))
            except (ValueError, ProtocolError):
                self.manifest = None
        self.report: ShadowReport | None = None
        if raw.get("report") is not None:
            from fedge.limits import DEFAULT_LIMITS

            try:
                self.report = ShadowReport.read(raw["report"], DEFAULT_LIMITS)
            except ProtocolError:
                self.report = None
        self.history: list[dict[str, Any]] = list(raw.get("history") or [])

    def path(self, version: int) -> Path:
        return self.dir / f"v{version:06d}.onnx"

    def model(self, held: Held | None) -> bytes | None:
        """The bytes of ``held`` if they are on disk and match its sha256."""
        if held is None:
            return None
        try:
            data = self.path(held.version).read_bytes()
        except OSError:
            return None
        return data if hashlib.sha256(data).hexdigest() == held.sha256 else None

    def bytes_of(self, version: int, sha256: str) -> bytes | None:
        for held in (self.serving, self.lkg):
            if held is not None and (held.version, held.sha256) == (version, sha256):
                return self.model(held)
        return None

    def set_manifest(self, m: ReleaseManifest) -> None:
        self.manifest = m
        self._save()

    def set_report(self, r: ShadowReport) -> None:
        self.report = r
        self._save()

    def switch(
        self, version: int, sha256: str, onnx: bytes, seq: int, *, back: bool = False
    ) -> None:
        """Serve ``version`` from now on; what was served becomes the last known good, unless
        the switch goes ``back`` (a rollback: what was served is not known good)."""
        if self.serving is not None and (self.serving.version, self.serving.sha256) == (
            version,
            sha256,
        ):
            return
        atomic_write(self.path(version), onnx)
        old = self.serving
        if old is not None and old.version != version and not (back and self.lkg is not None):
            self.lkg = old
        self.serving = Held(version, sha256)
        self.history = [
            *self.history[-_HISTORY + 1 :],
            {"version": version, "seq": seq, "ts": time.time()},
        ]
        self._save()
        keep = {h.version for h in (self.serving, self.lkg) if h is not None}
        for p in self.dir.glob("v*.onnx"):
            if p.stem[1:].isdigit() and int(p.stem[1:]) not in keep:
                p.unlink(missing_ok=True)

    def _save(self) -> None:
        raw = {
            "serving": _dump(self.serving),
            "lkg": _dump(self.lkg),
            "manifest": self.manifest.to_bytes().hex() if self.manifest else None,
            "report": self.report.to_map() if self.report else None,
            "history": self.history,
        }
        atomic_write(self.dir / "serving.json", json.dumps(raw, sort_keys=True).encode())


def load_serving(state_dir: Path) -> tuple[int, bytes]:
    """(version, ONNX bytes) a device in ``state_dir`` serves; ``ConfigError`` if none was
    released to it yet or its file does not match."""
    store = ServingStore(state_dir)
    if store.serving is None:
        raise ConfigError(
            f"{state_dir}: no serving version yet (released by `fedge rollout start`)"
        )
    onnx = store.model(store.serving)
    if onnx is None:
        raise ConfigError(f"{store.path(store.serving.version)}: missing or not its sha256")
    return store.serving.version, onnx


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def _held(raw: Any) -> Held | None:
    if isinstance(raw, dict) and isinstance(raw.get("version"), int):
        return Held(int(raw["version"]), str(raw.get("sha256", "")))
    return None


def _dump(h: Held | None) -> dict[str, Any] | None:
    return None if h is None else {"version": h.version, "sha256": h.sha256}
