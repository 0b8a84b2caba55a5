"""A refused identity does not retry forever (issue 12, identity operations).

Seen in the field: a wrong password or a revoked device made the agent and the aggregator
retry forever, one identical warning per try. Here each runs as the operator runs it, a
separate process, against a Mosquitto that checks passwords: after a bounded run of refusals
each exits non-zero with one line naming the refused identity and why.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedge.topics import Topics
from fedge.transport.mqtt import BrokerURL
from fedge.transport.mux import Mux
from fedge.transport.session import Session, SessionOptions
from fedge_cli.pki.passwords import set_password
from simulation.broker import MosquittoBroker, MosquittoNotFound, find_mosquitto

pytestmark = pytest.mark.integration

WAIT = 40.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def password_broker(tmp_path: Path) -> Iterator[int]:
    """A broker on loopback that knows dev1 and aggregator, each with its right password."""
    try:
        mosquitto = find_mosquitto()
    except MosquittoNotFound as exc:
        pytest.skip(str(exc))
    passwd = tmp_path / "passwd"
    passwd.touch()
    for user in ("dev1", "aggregator"):
        set_password(passwd, user, "right-password")
    port = _free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {passwd}\n"
        f"log_dest file {tmp_path / 'mosquitto.log'}\n"
        # as root, stay root: the mosquitto user cannot read pytest's 0700 temp dirs
        + ("user root\n" if os.geteuid() == 0 else "")
    )
    broker = subprocess.Popen(
        [mosquitto, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + WAIT
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the broker did not start"
                time.sleep(0.05)
        yield port
    finally:
        broker.terminate()
        broker.wait(timeout=WAIT)


def test_agent_and_aggregator_with_a_wrong_password_exit_with_one_line(
    password_broker: int, tmp_path: Path
) -> None:
    # Prepare: both roles configured with password_file holding a wrong password
    wrong = tmp_path / "password"
    wrong.write_text("wrong-password\n")
    url = f"mqtt://127.0.0.1:{password_broker}"
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "d.npz", x=rng.random((20, 64), dtype=np.float32), y=rng.integers(0, 10, 20)
    )
    agent_cfg = tmp_path / "agent.yaml"
    agent_cfg.write_text(
        f"device_id: dev1\nbroker: {url}\npassword_file: {wrong}\ndata: {tmp_path / 'd.npz'}\n"
        f"state_dir: {tmp_path / 'agent'}\n"
    )
    agg_cfg = tmp_path / "aggregator.yaml"
    agg_cfg.write_text(
        f"broker: {url}\npassword_file: {wrong}\nstate_dir: {tmp_path / 'agg'}\n"
        "model: {input_dim: 64, num_classes: 10}\n"
    )

    # Execute: both at once, as separate processes
    started = time.monotonic()
    procs = {
        "agent": subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "--config", str(agent_cfg)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        ),
        "aggregator": subprocess.Popen(
            [sys.executable, "-m", "aggregator", "--config", str(agg_cfg)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        ),
    }
    try:
        out = {name: p.communicate(timeout=WAIT)[1] for name, p in procs.items()}
    finally:
        for p in procs.values():
            p.kill()
    took = time.monotonic() - started

    # Assert: each exits non-zero, its last line names the identity and the reason, and the
    # refusal was warned about once while it retried
    for name, who in (("agent", "dev1"), ("aggregator", "aggregator")):
        lines = out[name].strip().splitlines()
        assert procs[name].returncode == 2, out[name]  # a user error: one line, exit 2
        assert lines[-1] == (
            f"fedge {name}: error: the broker refused identity {who!r} 5 times in a row: "
            "Not authorized (a wrong password or password_file, a revoked device, or a name "
            "the broker does not know); giving up"
        ), out[name]
        assert sum("refused identity" in line for line in lines) == 2, out[name]
    assert took < WAIT


def test_a_second_aggregator_of_the_fleet_gives_up_and_the_first_keeps_running(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    """Seen in the field: a second aggregator of a fleet (or another fleet's, with the same
    username) and the first kicked each other off, 18 disconnects in 17 s, no hint."""
    # Prepare: the first aggregator's identity, connected and stable
    url = BrokerURL.parse(broker.url)
    fleet = f"f{uuid.uuid4().hex[:8]}"
    mux = Mux("first").start()
    first = Session(
        mux,
        url,
        SessionOptions("aggregator", "aggregator", stable_after=1.0, max_takeovers=5),
        subscriptions=[Topics(fleet).all_statuses],
        on_message=lambda _t, _p: None,
    )
    first.start()
    cfg = tmp_path / "aggregator.yaml"
    cfg.write_text(f"broker: {broker.url}\nfleet: {fleet}\nstate_dir: {tmp_path / 'agg'}\n")
    try:
        deadline = time.monotonic() + WAIT
        while not first.connected:
            assert time.monotonic() < deadline, first.last_error
            time.sleep(0.05)
        time.sleep(1.5)  # held longer than stable_after

        # Execute: a second aggregator of the same fleet, as a process
        second = subprocess.run(
            [sys.executable, "-m", "aggregator", "--config", str(cfg)],
            capture_output=True,
            text=True,
            timeout=WAIT,
        )
        time.sleep(1.0)

        # Assert: the second exits with one line; the first holds its identity
        assert second.returncode == 2, second.stderr  # a user error: one line, exit 2
        assert (
            second.stderr.strip()
            .splitlines()[-1]
            .startswith(
                "fedge aggregator: error: the connection as 'aggregator' (client id 'aggregator') "
                "was closed 5 times in a row within seconds of connecting: another client holds "
                "this identity"
            )
        ), second.stderr
        assert first.connected
        assert first.refused is None
    finally:
        mux.call_soon(first.close)
        time.sleep(0.2)
        mux.stop()
