"""aggregator/journal.py: durable, replayable, tolerant of a torn last record."""

from __future__ import annotations

from pathlib import Path

from aggregator.journal import RoundJournal


def replay(directory: Path, round_id: int) -> list[tuple[str, bytes]]:
    j = RoundJournal(directory)
    try:
        return j.open(round_id)
    finally:
        j.close()


def test_records_survive_reopen_in_order(tmp_path: Path) -> None:
    j = RoundJournal(tmp_path)
    assert j.open(7) == []
    j.append("dev-a", b"one")
    j.append("dev-b", b"\x00" * 1000)
    j.close()

    got = replay(tmp_path, 7)

    assert got == [("dev-a", b"one"), ("dev-b", b"\x00" * 1000)]


def test_torn_last_record_is_cut_and_appends_continue(tmp_path: Path) -> None:
    j = RoundJournal(tmp_path)
    j.open(3)
    j.append("dev-a", b"kept")
    j.close()
    path = next(tmp_path.glob("round-*.journal"))
    whole = path.read_bytes()
    path.write_bytes(whole + whole[:7])  # a crash in the middle of the next append

    j2 = RoundJournal(tmp_path)
    first = j2.open(3)
    j2.append("dev-b", b"after")
    j2.close()

    assert first == [("dev-a", b"kept")]
    assert replay(tmp_path, 3) == [("dev-a", b"kept"), ("dev-b", b"after")]


def test_discard_through_removes_closed_rounds_only(tmp_path: Path) -> None:
    j = RoundJournal(tmp_path)
    for r in (1, 2, 3):
        j.open(r)
        j.append("d", bytes([r]))
    j.close()

    j.discard_through(2)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-00000003.journal"]
    assert replay(tmp_path, 3) == [("d", b"\x03")]
