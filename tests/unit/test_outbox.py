"""edge_agent/outbox.py: unacknowledged updates survive a restart, in order."""

from __future__ import annotations

from pathlib import Path

from edge_agent.outbox import Outbox


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
