"""How an operator reaches the rollout controller: request files in the aggregator's state
directory, never the broker.

Threat model: anyone who can connect to the broker is hostile, so a command that changes
what the fleet serves must not travel over it. ``fedge rollout ...`` runs on the
aggregator's host (or over ssh to it) and writes ``STATE_DIR/rollout-requests/<id>.json``
(created under a temporary name, then renamed: the aggregator never reads half a request);
who may command a rollout is who may write the aggregator's state directory (mode 0700 by
default, the aggregator's user), the same trust as its checkpoint and signing key. The
aggregator looks at the directory every ``POLL_SECONDS`` on its loop, carries the request
out, writes ``<id>.result.json`` and deletes the request. ``fedge rollout status`` only reads
``STATE_DIR/rollout.json`` and needs no running aggregator.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedge.errors import ConfigError, FedgeError
from fedge.support.fsutil import atomic_write

__all__ = ["POLL_SECONDS", "REQUESTS_DIR", "handle_requests", "submit", "wait_result"]

log = logging.getLogger(__name__)

REQUESTS_DIR = "rollout-requests"
POLL_SECONDS = 0.5
_COMMANDS = ("start", "promote", "abort", "rollback")


def submit(state_dir: Path, command: str, args: dict[str, Any]) -> str:
    """Write a request; its id."""
    if command not in _COMMANDS:
        raise ConfigError(f"unknown rollout command {command!r}")
    folder = Path(state_dir) / REQUESTS_DIR
    if not Path(state_dir).is_dir():
        raise ConfigError(f"{state_dir} is not an aggregator state directory")
    folder.mkdir(mode=0o700, exist_ok=True)
    rid = f"{time.time_ns():020d}-{secrets.token_hex(4)}"
    body = {"id": rid, "command": command, "args": args, "ts": time.time()}
    atomic_write(folder / f"{rid}.json", json.dumps(body).encode(), mode=0o600)
    return rid


def wait_result(state_dir: Path, rid: str, timeout: float) -> dict[str, Any]:
    """The aggregator's answer to request ``rid``; ``ConfigError`` if none within ``timeout``
    (the request is withdrawn if the aggregator has not taken it)."""
    folder = Path(state_dir) / REQUESTS_DIR
    result = folder / f"{rid}.result.json"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if result.exists():
            answer: dict[str, Any] = json.loads(result.read_text())
            result.unlink(missing_ok=True)
            return answer
        time.sleep(0.1)
    try:
        os.unlink(folder / f"{rid}.json")
    except FileNotFoundError:
        pass  # taken meanwhile: its result comes, unread
    else:
        raise ConfigError(f"no aggregator took the request within {timeout:g} s: is it running?")
    raise ConfigError(f"the aggregator took the request but did not answer in {timeout:g} s")


def handle_requests(state_dir: Path, run: Callable[[str, dict[str, Any]], str]) -> int:
    """Carry out every pending request in id order with ``run(command, args)`` (which returns
    one line or raises ``ConfigError``); the number handled."""
    folder = Path(state_dir) / REQUESTS_DIR
    if not folder.is_dir():
        return 0
    done = 0
    for path in sorted(folder.glob("*.json")):
        if path.name.endswith(".result.json") or path.name.startswith("."):
            continue
        try:
            req = json.loads(path.read_text())
            command, args = str(req["command"]), dict(req.get("args") or {})
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("rollout request %s refused: %s", path.name, e)
            answer: dict[str, Any] = {"ok": False, "message": f"unreadable request: {e}"}
        else:
            try:
                if command not in _COMMANDS:
                    raise ConfigError(f"unknown command {command!r}")
                answer = {"ok": True, "message": run(command, args)}
            except (FedgeError, ValueError, TypeError, KeyError) as e:
                answer = {"ok": False, "message": str(e)}
            log.info("rollout %s %s: %s", command, args, answer["message"])
        atomic_write(path.with_suffix(".result.json"), json.dumps(answer).encode(), mode=0o600)
        path.unlink(missing_ok=True)
        done += 1
    return done
