"""edge_agent/outbox.py: unacknowledged updates survive a restart, in order."""

from __future__ import annotations

from pathlib import Path

from edge_agent.outbox import Outbox
from fedge.envelopes import RoundTask, TrainHyper


def test_pending_survives_reopen_and_remove_clears(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    box.put(12, "b" * 32, b"second")
    box.put(3, "a" * 32, b"first")

    again = Outbox(tmp_path)
    pending = again.pending()
    again.remove(3, "a" * 32)

    assert pending == [(3, "a" * 32, b"first"), (12, "b" * 32, b"second")]
    assert Outbox(tmp_path).pending() == [(12, "b" * 32, b"second")]
    assert len(again) == 1


def test_the_agent_keeps_updates_of_rounds_the_task_still_accepts(tmp_path: Path) -> None:
    """Async tasks say which older rounds still take updates (``accepts_from``): their
    unreceipted updates stay in the outbox; older ones, and all older ones in sync mode, go.
    The agent does this on every task with ``outbox.drop_before(task.oldest_accepted)``."""
    box = Outbox(tmp_path / "dev-0")
    for r in (3, 5, 6):
        box.put(r, f"{r:032x}", b"u")

    def task(round_id: int, accepts_from: int | None) -> RoundTask:
        return RoundTask(round_id, 1, 0.0, "fp32", TrainHyper(), b"n" * 16, (), 0.0, accepts_from)

    box.drop_before(task(7, accepts_from=5).oldest_accepted)
    assert [p[0] for p in box.pending()] == [5, 6]
    box.drop_before(task(8, accepts_from=None).oldest_accepted)  # sync: only round 8 counts
    assert box.pending() == []
