"""What an agent keeps on disk so that a reboot resumes: the model it holds and the last round
it finished (so it never trains or sends the same round twice)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from fedge.envelopes import GlobalModel, ModelArch
from fedge.support.fsutil import atomic_write

__all__ = ["AgentStore", "HeldModel"]


@dataclass(frozen=True)
class HeldModel:
    version: int
    arch: ModelArch
    sha256: str
    onnx: bytes


class AgentStore:
    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def model_path(self) -> Path:
        return self.dir / "model.onnx"

    def save_model(self, m: GlobalModel) -> None:
        # ONNX first, then its metadata: metadata never points at bytes that are not there.
        atomic_write(self.model_path, m.onnx)
        meta = {"version": m.version, "arch": asdict(m.arch), "sha256": m.sha256}
        atomic_write(self.dir / "model.json", json.dumps(meta).encode())

    def load_model(self) -> HeldModel | None:
        import hashlib

        try:
            meta = json.loads((self.dir / "model.json").read_text())
            onnx = self.model_path.read_bytes()
        except (OSError, ValueError):
            return None
        if hashlib.sha256(onnx).hexdigest() != meta.get("sha256"):
            return None
        return HeldModel(meta["version"], ModelArch(**meta["arch"]), meta["sha256"], onnx)

    def last_round(self) -> int:
        try:
            return int(json.loads((self.dir / "state.json").read_text())["last_round"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def record_acked(self, round_id: int, update_id: str) -> None:
        """Append-only receipt of an update the broker acknowledged (an audit trail)."""
        with (self.dir / "acked.jsonl").open("a") as f:
            f.write(json.dumps({"round": round_id, "update_id": update_id}) + "\n")

    def acked(self) -> list[dict[str, object]]:
        try:
            lines = (self.dir / "acked.jsonl").read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(x) for x in lines if x.strip()]

    def set_last_round(self, round_id: int) -> None:
        atomic_write(self.dir / "state.json", json.dumps({"last_round": round_id}).encode())
