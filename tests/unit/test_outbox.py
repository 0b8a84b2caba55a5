"""edge_agent/outbox.py: unacknowledged updates survive a restart, in order."""

from __future__ import annotations

from pathlib import Path

from edge_agent.outbox import Outbox


def test_pending_survives_reopen_and_remove_clears(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    box.put(12, "b" * 32, b"second")
    box.put(3, "a" * 32, b"first")

    again = Outbox(tmp_path)
    pending = again.pending()
    again.remove(3, "a" * 32)

    assert pending == [(3, "a" * 32, b"first"), (12, "b" * 32, b"second")]
    assert Outbox(tmp_path).pending() == [(12, "b" * 32, b"second")]
    assert len(again) == 1


def test_the_agent_keeps_updates_of_rounds_the_task_still_accepts(tmp_path: Path) -> None:
    """Async tasks say which older rounds still take updates (``accepts_from``): their
    unreceipted updates stay in the outbox; older ones, and all older ones in sync mode, go.
    The agent is built but never connected: this checks its bookkeeping only."""
    import numpy as np

    from edge_agent.agent import EdgeAgent
    from edge_agent.data import LocalData
    from edge_agent.store import AgentStore
    from fedge.envelopes import RoundTask, TrainHyper
    from fedge.topics import Topics
    from fedge.transport.mqtt import BrokerURL
    from fedge.transport.mux import Mux

    mux = Mux("unused").start()
    agent = EdgeAgent(
        device_id="dev-0",
        mux=mux,
        broker=BrokerURL.parse("mqtt://127.0.0.1:1"),
        topics=Topics("t"),
        data=LocalData(np.zeros((2, 4), np.float32), np.zeros(2, np.int64)),
        store=AgentStore(tmp_path / "dev-0"),
        executor=None,  # type: ignore[arg-type]
    )
    for r in (3, 5, 6):
        agent.outbox.put(r, f"{r:032x}", b"u")

    def task(round_id: int, accepts_from: int | None) -> RoundTask:
        return RoundTask(round_id, 1, 0.0, "fp32", TrainHyper(), b"n" * 16, (), 0.0, accepts_from)

    try:
        agent._on_task(task(7, accepts_from=5))
        assert [p[0] for p in agent.outbox.pending()] == [5, 6]
        agent._on_task(task(8, accepts_from=None))  # sync: only round 8 itself counts
        assert agent.outbox.pending() == []
    finally:
        mux.stop()
