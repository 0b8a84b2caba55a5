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


def wait_for_signal(done: threading.Event | None = None) -> None:
    """Block until SIGINT/SIGTERM (or ``done`` is set)."""
    stop = done or threading.Event()

    def handler(_sig: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    while not stop.wait(0.5):
        pass
