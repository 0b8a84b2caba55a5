"""An append-only, fsynced record of the updates accepted in the open round.

The aggregator acknowledges an update to the broker only after its bytes are in this journal
(see ``Session(manual_ack=True)``), so a crash at any point loses nothing: on restart the
journal of the open round is replayed through the same validation and folding, and the
broker redelivers whatever was not yet acknowledged, which then counts as a duplicate.

Record layout: a 4-byte big-endian length, then a msgpack array ``[device, payload]``. A torn
last record (a crash mid-append) is cut off on open.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import msgpack

__all__ = ["RoundJournal"]

_LEN = struct.Struct(">I")


class RoundJournal:
    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._f: object | None = None
        self._round: int | None = None

    def _path(self, round_id: int) -> Path:
        return self.dir / f"round-{round_id:08d}.journal"

    def open(self, round_id: int) -> list[tuple[str, bytes]]:
        """Start (or resume) the journal of ``round_id``; returns the records already in it."""
        self.close()
        path = self._path(round_id)
        records, good = self._read(path)
        with open(path, "ab") as f:
            if f.tell() != good:
                f.truncate(good)
        self._f = open(path, "ab")  # noqa: SIM115 - held open for the round
        self._round = round_id
        return records

    def records(self, round_id: int) -> list[tuple[str, bytes]]:
        """The records of ``round_id`` so far, read only (the journal stays as it is)."""
        return self._read(self._path(round_id))[0]

    def append(self, device: str, payload: bytes) -> None:
        """Durably record one update; returns only after fsync."""
        if self._f is None:
            raise RuntimeError("journal is not open")
        body = msgpack.packb([device, payload], use_bin_type=True)
        f = self._f
        f.write(_LEN.pack(len(body)) + body)  # type: ignore[attr-defined]
        f.flush()  # type: ignore[attr-defined]
        os.fsync(f.fileno())  # type: ignore[attr-defined]

    def close(self) -> None:
        if self._f is not None:
            self._f.close()  # type: ignore[attr-defined]
        self._f = None

    def rounds(self) -> list[int]:
        """The rounds with a journal on disk, in order."""
        out = []
        for p in self.dir.glob("round-*.journal"):
            with contextlib.suppress(ValueError, IndexError):
                out.append(int(p.stem.split("-")[1]))
        return sorted(out)

    def discard_through(self, round_id: int) -> None:
        """Delete journals of rounds <= ``round_id`` (closed: their effect is checkpointed)."""
        if self._round is not None and self._round <= round_id:
            self.close()
            self._round = None
        for p in self.dir.glob("round-*.journal"):
            with contextlib.suppress(ValueError, OSError):
                if int(p.stem.split("-")[1]) <= round_id:
                    p.unlink()

    @staticmethod
    def _read(path: Path) -> tuple[list[tuple[str, bytes]], int]:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return [], 0
        out: list[tuple[str, bytes]] = []
        end = 0
        for end, rec in _records(data):  # noqa: B007 - end of the last good record is kept
            out.append(rec)
        return out, end


def _records(data: bytes) -> Iterator[tuple[int, tuple[str, bytes]]]:
    """Yield (end offset, record) for every complete, well-formed record."""
    pos = 0
    while pos + _LEN.size <= len(data):
        (n,) = _LEN.unpack_from(data, pos)
        end = pos + _LEN.size + n
        if end > len(data):
            return
        try:
            device, payload = msgpack.unpackb(data[pos + _LEN.size : end], raw=False)
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError):
            return
        pos = end
        yield pos, (device, payload)
