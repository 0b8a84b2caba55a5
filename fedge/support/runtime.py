"""Running a role in the foreground until SIGINT/SIGTERM: logging and signal handling."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from types import FrameType
from typing import NoReturn

from fedge.errors import ConfigError

__all__ = [
    "LOG_LEVELS",
    "USER_ERROR",
    "exit_user_error",
    "log_level",
    "setup_logging",
    "wait_for_signal",
]

USER_ERROR = 2
"""Exit status of every user error (bad flag, config, input file), as argparse's own."""


def exit_user_error(prog: str, error: BaseException | str) -> NoReturn:
    """One line on stderr, ``PROG: error: ...``, and exit status 2."""
    print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
    sys.exit(USER_ERROR)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
"""What ``--log-level`` accepts (any case); anything else is refused, never read as INFO."""


def log_level(text: str) -> str:
    """``--log-level`` argument type: the level in upper case, or a one-line refusal."""
    level = text.strip().upper()
    if level not in LOG_LEVELS:
        msg = f"unknown log level {text!r}; choose one of {', '.join(LOG_LEVELS)}"
        raise argparse.ArgumentTypeError(msg)
    return level


def setup_logging(level: str = "INFO") -> None:
    if level.upper() not in LOG_LEVELS:
        raise ConfigError(f"unknown log level {level!r}; choose one of {', '.join(LOG_LEVELS)}")
    logging.basicConfig(
        level=getattr(logging, level.upper()),
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
