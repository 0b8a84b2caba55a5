"""The agent's states and the pure decision of what to do with the model and task it holds.

    CONNECTING -> WAITING_MODEL -> WAITING_TASK -> TRAINING -> UPLOADING -> IDLE
                        ^               ^                                   |
                        +---------------+--------- next model / task -------+

Retained messages make the order of arrival free: a device that connects late (or reboots)
gets the current model and task at once and joins the round if it is asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from edge_agent.store import HeldModel
from fedge.envelopes import RoundTask

__all__ = ["AgentCounters", "AgentState", "next_state"]


class AgentState(StrEnum):
    CONNECTING = "connecting"
    WAITING_MODEL = "waiting_model"
    WAITING_TASK = "waiting_task"
    TRAINING = "training"
    UPLOADING = "uploading"
    IDLE = "idle"


@dataclass
class AgentCounters:
    rx_bytes: int = 0  # MQTT PUBLISH packets received (model, task)
    tx_bytes: int = 0  # MQTT PUBLISH packets of updates sent
    tx_status_bytes: int = 0  # MQTT PUBLISH packets of online statuses sent (not the will)
    updates_sent: int = 0
    rounds_skipped: int = 0
    models_rejected: int = 0
    tasks_rejected: int = 0  # unsigned, badly signed or implausible (fedge.task_check)
    releases_rejected: int = 0  # release manifests or models refused (edge_agent.serving)
    # rx_bytes split by what came down (edge_agent.downlink); receipts are the rest.
    rx_model_bytes: int = 0  # full models and their chunks
    rx_patch_bytes: int = 0
    rx_task_bytes: int = 0
    patches_rejected: int = 0  # malformed, unsigned, forged or too large


def next_state(
    model: HeldModel | None,
    task: RoundTask | None,
    *,
    last_round: int,
    device_id: str,
    now: float,
) -> AgentState:
    """Where a device that is free to work (neither connecting, training nor uploading) goes.

    ``TRAINING`` means: train ``task`` from ``model`` now. A task for a newer model than the
    one held waits for that model; a task for an older one, or past its deadline, is let go.
    """
    if model is None:
        return AgentState.WAITING_MODEL
    if task is None:
        return AgentState.WAITING_TASK
    if task.round <= last_round or not task.asks(device_id):
        return AgentState.IDLE
    if model.version < task.base_version:
        return AgentState.WAITING_MODEL
    if model.version > task.base_version or now > task.deadline:
        return AgentState.IDLE
    return AgentState.TRAINING
