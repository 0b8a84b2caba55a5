"""What a receiver checks on a round task before it holds it (or lets it touch its state):
devices (``edge_agent``) and shard workers (``aggregator.sharded``) alike.

A task decides what the device does next and, once answered, the round id it persists as done
(``AgentStore.set_last_round``): a forged task with round 2**31 would make every later round
look already done. So a device that holds the aggregator's key takes only tasks signed by it
over every field (``fedge.identity.task_digest``), and any device refuses a round id that its
base version makes implausible (``Limits.max_round_lead``).
"""

from __future__ import annotations

from fedge.envelopes import RoundTask
from fedge.errors import ProtocolError
from fedge.identity import VerifyKey
from fedge.limits import Limits

__all__ = ["check_task", "plausible_last_round"]


def check_task(task: RoundTask, key: VerifyKey | None, limits: Limits) -> RoundTask:
    """``task`` if it may be held; ``ProtocolError`` (reason ``unsigned_task``,
    ``bad_signature`` or ``implausible_round``) if not."""
    if key is not None:
        if not task.signature:
            raise ProtocolError("unsigned_task", f"round {task.round}: task is not signed")
        if not key.verify(task.digest(), task.signature):
            raise ProtocolError("bad_signature", f"round {task.round}: task signature is bad")
    # Version v exists only after v successful rounds, and a failed round uses an id without
    # making a version: round - base_version - 1 is the number of rounds the fleet has failed.
    lead = task.round - task.base_version
    if not 1 <= lead <= limits.max_round_lead:
        raise ProtocolError(
            "implausible_round",
            f"round {task.round} on base v{task.base_version}: the round id must exceed the "
            f"base version by 1 to {limits.max_round_lead}",
        )
    return task


def plausible_last_round(last_round: int, held_version: int | None, limits: Limits) -> bool:
    """Whether a persisted last round could have come from a task on the held model or an
    older one (a device bricked before tasks were signed has 2**31 on disk)."""
    return held_version is None or last_round - held_version <= limits.max_round_lead
