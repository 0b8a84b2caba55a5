"""Fault injection for the reliability suite (tests/faults, bench/soak).

``FEDGE_CRASH_AT=<point>`` makes the process SIGKILL itself when it reaches that point, so a
test can place a crash exactly between two steps (e.g. after an update is journaled but before
it is acknowledged). Unset — always, outside tests — it costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

__all__ = ["crash_point"]


def crash_point(name: str) -> None:
    if os.environ.get("FEDGE_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
