"""Per-round metrics as JSON lines; counters of rejected messages by reason, and of events
that are not rejections (e.g. a clamped sample count)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["MetricsLog"]


class MetricsLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rejected: Counter[str] = Counter()
        self.events: Counter[str] = Counter()
        self.accepted = 0

    def reject(self, reason: str, count: int = 1) -> None:
        self.rejected[reason] += count

    def event(self, name: str) -> None:
        self.events[name] += 1

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
