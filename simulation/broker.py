"""A local Mosquitto for simulation and tests, configured from ``broker_config/``.

The broker listens on 127.0.0.1 only, keeps its config, ACL, data and log in one
work directory, and can be stopped, SIGKILLed and restarted on the same port and
data, which is what the fault tests need.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from fedge.support.shipped import broker_config_dir

__all__ = [
    "BROKER_MAX_PACKET_SIZE",
    "MosquittoBroker",
    "MosquittoNotFound",
    "find_mosquitto",
]

# Must equal max_packet_size in broker_config/local.conf.template: the broker
# disconnects a client that sends a bigger packet, and paho does not check first.
BROKER_MAX_PACKET_SIZE = 16 * 1024 * 1024

CONFIG_DIR = broker_config_dir()
_HOST = "127.0.0.1"
# Debian installs the broker in /usr/sbin, which is not on a normal user's PATH.
_FALLBACK_PATHS = (Path("/usr/sbin/mosquitto"), Path("/usr/local/sbin/mosquitto"))
_LOG_TAIL_LINES = 30
# Logged (at level "information") once every listener is bound.
_RUNNING = re.compile(r"mosquitto version \S+ running")
_LOGS_INFORMATION = re.compile(r"^log_type\s+(information|all)\s*$", re.MULTILINE)


class MosquittoNotFound(RuntimeError):
    """No mosquitto executable on this machine."""

    def __init__(self) -> None:
        super().__init__(
            "mosquitto not found; install it with: sudo apt-get install -y mosquitto "
            "(Debian/Ubuntu) — or pass --broker mqtt://HOST:PORT to use an existing broker"
        )


def find_mosquitto() -> str:
    """Return the path of the mosquitto executable, or raise MosquittoNotFound."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in _FALLBACK_PATHS:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise MosquittoNotFound()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return int(sock.getsockname()[1])


def _port_free(port: int) -> bool:
    # SO_REUSEADDR as Mosquitto sets it: sockets left in TIME_WAIT by a killed
    # broker do not count, a live listener does.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((_HOST, port))
        except OSError:
            return False
        return True


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class MosquittoBroker:
    """One Mosquitto process on 127.0.0.1, owned by the caller.

    ``workdir`` receives ``mosquitto.conf``, a copy of the ACL, ``data/`` (persistence)
    and ``mosquitto.log``. ``port`` defaults to a free port chosen now, so ``url`` is
    known before ``start()`` and stays the same across ``restart()``.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        template: Path | None = None,
        acl: Path | None = None,
        port: int | None = None,
        params: Mapping[str, object] | None = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.template = (
            Path(template) if template is not None else CONFIG_DIR / "local.conf.template"
        )
        self.acl = Path(acl) if acl is not None else CONFIG_DIR / "acl"
        for name, path in (("config template", self.template), ("ACL file", self.acl)):
            if not path.is_file():
                raise FileNotFoundError(
                    f"broker {name} not found at {path}; it ships in broker_config/ of the "
                    f"fedge source tree (run from a checkout, or pass template=/acl=)"
                )
        text = self.template.read_text()
        if "{log_file}" not in text or not _LOGS_INFORMATION.search(text):
            raise ValueError(
                f"{self.template} must contain 'log_dest file {{log_file}}' and "
                f"'log_type information': start() waits for the 'running' line of that log"
            )
        # More placeholders of the template (a site's: fleet, site, remote_host, ...).
        self.params = dict(params or {})
        self._port_chosen = port is None
        self._port = _free_port() if port is None else port
        self._proc: subprocess.Popen[bytes] | None = None
        self._executable = find_mosquitto()

    # -- addresses and files -------------------------------------------------

    @property
    def host(self) -> str:
        return _HOST

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"mqtt://{_HOST}:{self._port}"

    @property
    def config_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    @property
    def _stderr_path(self) -> Path:
        return self.workdir / "mosquitto.stderr"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle ------------------------------------------------------------

    def start(self, timeout: float = 10) -> MosquittoBroker:
        """Start the broker; return once it has logged "running" and its port accepts."""
        if self.running:
            raise RuntimeError(f"broker already running (pid {self.pid}) on {self.url}")
        self._write_config()
        self._check_data_dir_writable()
        # A port picked by bind(0) can be taken by someone else before mosquitto
        # binds it; retry with a fresh port, but only before the first success,
        # because afterwards clients and restart() rely on the port staying the same.
        attempts = 3 if self._port_chosen else 1
        for attempt in range(attempts):
            try:
                self._spawn_and_wait(timeout)
            except _PortInUse:
                if attempt == attempts - 1:
                    raise RuntimeError(
                        f"cannot start mosquitto: {_HOST}:{self._port} is already in use "
                        f"by another program"
                    ) from None
                self._port = _free_port()
                self._write_config()
            else:
                self._port_chosen = False
                return self
        raise AssertionError("unreachable")

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM (Mosquitto saves its database), then SIGKILL if it hangs."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        self._proc = None

    def kill(self) -> None:
        """SIGKILL, no chance to save: what a power cut or OOM kill looks like."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        self._proc = None

    def restart(self, timeout: float = 10) -> MosquittoBroker:
        """Stop if running, then start again on the same port and data directory."""
        self.stop()
        self._port_chosen = False
        return self.start(timeout)

    def __enter__(self) -> MosquittoBroker:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"MosquittoBroker({self.url}, {state}, workdir={str(self.workdir)!r})"

    # -- internals --------------------------------------------------------------

    def _write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        acl_copy = self.workdir / "acl"
        shutil.copyfile(self.acl, acl_copy)
        config = self.template.read_text().format(
            port=self._port,
            data_dir=self.data_dir,
            acl_file=acl_copy,
            log_file=self.log_path,
            **self.params,
        )
        if os.geteuid() == 0:
            # Started as root, Mosquitto switches to the "mosquitto" user, which
            # cannot even traverse a root-owned 0700 temp dir (pytest's are), so
            # persistence fails with only a log line. Chowning the data dir is not
            # enough (the log, the ACL and every parent dir need access too; measured:
            # it then cannot open the log or the ACL and exits), so keep the
            # broker running as the user who started it: this broker is
            # loopback-only and exists for simulation and tests.
            config += "\n# Added by simulation/broker.py: run as the invoking user.\nuser root\n"
        self.config_path.write_text(config)

    def _check_data_dir_writable(self) -> None:
        # The broker runs as the current user (see _write_config), so our own
        # access is the broker's access.
        probe = self.data_dir / ".write-probe"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise RuntimeError(
                f"broker data directory {self.data_dir} is not writable ({exc}); Mosquitto "
                f"would run but silently lose every session and retained message on restart"
            ) from exc
        db = self.data_dir / "mosquitto.db"
        if db.exists() and not os.access(db, os.R_OK | os.W_OK):
            raise RuntimeError(f"broker database {db} is not readable and writable")

    def _spawn_and_wait(self, timeout: float) -> None:
        if not _port_free(self._port):
            raise _PortInUse
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self._stderr_path.open("wb") as stderr:
            self._proc = subprocess.Popen(
                [self._executable, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                self._proc = None
                if "Address already in use" in self._new_log(log_offset):
                    raise _PortInUse
                raise RuntimeError(self._failure_message("exited during start"))
            # An open port alone could belong to another program that took it
            # first (Mosquitto then exits a moment later): also require this
            # process to have logged that all its listeners are up.
            if (
                _RUNNING.search(self._new_log(log_offset))
                and self._port_open()
                and self._proc.poll() is None
            ):
                return
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    self._failure_message(f"not up after {timeout}s (no 'running' in its log)")
                )
            time.sleep(0.02)

    def _port_open(self) -> bool:
        try:
            with socket.create_connection((_HOST, self._port), timeout=0.2):
                return True
        except OSError:
            return False

    def _new_log(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(offset)
                log = fh.read().decode(errors="replace")
        except OSError:
            log = ""
        return log + _tail(self._stderr_path)

    def _failure_message(self, what: str) -> str:
        return (
            f"mosquitto {what} on {self.url} (config {self.config_path}).\n"
            f"--- {self.log_path} (tail) ---\n{_tail(self.log_path)}\n"
            f"--- stderr ---\n{_tail(self._stderr_path)}"
        )


class _PortInUse(Exception):
    pass
