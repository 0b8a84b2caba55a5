"""edge_agent/states.py: what a free device does with the model and the task it holds."""

from __future__ import annotations

import pytest

from edge_agent.states import AgentState, next_state
from edge_agent.store import HeldModel
from fedge.envelopes import ModelArch, RoundTask, TrainHyper

NOW = 1000.0


def held(version: int) -> HeldModel:
    return HeldModel(version, ModelArch("mlp", 4, 2), "0" * 64, b"")


def task(round_id: int = 5, base: int = 3, deadline: float = NOW + 60, **kw: object) -> RoundTask:
    return RoundTask(round_id, base, deadline, "fp32", TrainHyper(), b"n" * 16, **kw)  # type: ignore[arg-type]


def decide(model: HeldModel | None, t: RoundTask | None, last_round: int = 4) -> AgentState:
    return next_state(model, t, last_round=last_round, device_id="dev-1", now=NOW)


def test_trains_when_asked_on_the_model_it_holds() -> None:
    assert decide(held(3), task()) == AgentState.TRAINING
    assert decide(held(3), task(selected=("dev-1", "dev-2"))) == AgentState.TRAINING


@pytest.mark.parametrize(
    ("model", "t", "last_round", "want"),
    [
        (None, None, 0, AgentState.WAITING_MODEL),
        (None, task(), 0, AgentState.WAITING_MODEL),
        (held(3), None, 0, AgentState.WAITING_TASK),
        (held(3), task(round_id=4), 4, AgentState.IDLE),  # that round is done
        (held(3), task(selected=("dev-2",)), 4, AgentState.IDLE),  # not asked
        (held(2), task(), 4, AgentState.WAITING_MODEL),  # the task's model is on its way
        (held(4), task(), 4, AgentState.IDLE),  # the task is for an older model
        (held(3), task(deadline=NOW - 1), 4, AgentState.IDLE),  # too late
    ],
    ids=["nothing", "no-model", "no-task", "done", "not-asked", "older", "newer", "late"],
)
def test_otherwise_waits_or_idles(
    model: HeldModel | None, t: RoundTask | None, last_round: int, want: AgentState
) -> None:
    assert decide(model, t, last_round) == want
