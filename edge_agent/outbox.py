"""Updates not yet taken by the broker, kept on disk so a reboot resends them.

An update is written here before it is published and removed when the broker acknowledges
it (PUBACK, seen through ``on_publish``). At start the agent resends what is left, with the
same update id; the aggregator counts a (device, round) once, so a resend that was in fact
delivered is dropped as a duplicate.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from fedge.support.fsutil import atomic_write

__all__ = ["Outbox"]


class Outbox:
    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir) / "outbox"
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, round_id: int, update_id: str) -> Path:
        return self.dir / f"{round_id:010d}-{update_id}.msgpack"

    def put(self, round_id: int, update_id: str, payload: bytes) -> None:
        atomic_write(self._path(round_id, update_id), payload)

    def remove(self, round_id: int, update_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(round_id, update_id).unlink()

    def pending(self) -> list[tuple[int, str, bytes]]:
        """(round, update id, payload) of every update not yet acknowledged, oldest first."""
        out = []
        for p in sorted(self.dir.glob("*.msgpack")):
            head, _, uid = p.stem.partition("-")
            with contextlib.suppress(ValueError, OSError):
                out.append((int(head), uid, p.read_bytes()))
        return out

    def drop_before(self, round_id: int) -> None:
        """Forget updates of rounds before ``round_id``: closed, no receipt will come for them."""
        for r, uid, _ in self.pending():
            if r < round_id:
                self.remove(r, uid)

    def __len__(self) -> int:
        return sum(1 for _ in self.dir.glob("*.msgpack"))
