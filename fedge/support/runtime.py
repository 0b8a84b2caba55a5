"""Running a role in the foreground until SIGINT/SIGTERM: logging and signal handling."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

__all__ = ["setup_logging", "wait_for_signal"]


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )


def wait_for_signal(*done: threading.Event) -> bool:
    """Block until SIGINT/SIGTERM or until one of ``done`` is set; True if a signal ended it."""
    signalled = threading.Event()

    def handler(_sig: int, _frame: FrameType | None) -> None:
        signalled.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    while not signalled.wait(0.2):
        if any(e.is_set() for e in done):
            return False
    return True
