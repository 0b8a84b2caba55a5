"""``SecureRounds``: the sync round policy with secure aggregation (``secure_aggregation:``).

The aggregator never holds an individual update: devices send masked ring vectors, and the
aggregator recovers only the sum of the survivors' weighted, quantized deltas and the sum of
their weights (fedge.secagg; protocol §16). One round, each stage with its own deadline:

1. **advertise**: the task and ``Open`` (retained on ``{p}/secagg/stage``) go out; devices
   start training and advertise two X25519 keys, signed by their identity. Closes when every
   online device asked has advertised, or after ``advertise_timeout``.
2. **shares**: the signed ``Roster`` goes out; devices send their sealed Shamir shares, which
   the aggregator relays to each recipient's ``{p}/inbox/{device}`` unread. Closes when
   everyone on the roster shared, or after ``share_timeout``.
3. **masked**: devices send their masked inputs when trained; each is added to a running ring
   sum at once and dropped. Closes when everyone who shared has sent, or at the round's
   deadline less ``unmask_timeout``.
4. **unmask**: ``Unmask`` names survivors and the dropped; survivors return the shares the
   aggregator needs. Closes as soon as every secret can be recovered.

A stage short of ``min_devices``, or an unmask stage that cannot recover a secret by its
deadline, fails the round the usual way: model unchanged, the reason logged and counted in
the metrics line, the next round opens. Nothing of a secure round is journaled or
checkpointed but the task; an aggregator restarted mid-round fails that round.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np

from aggregator.modes import SyncRounds
from aggregator.parts import RoundParts
from aggregator.rounds import OpenRound
from aggregator.strategies.dp_fedavg import DPFedAvg
from aggregator.strategies.streaming import StreamingStrategy
from fedge.envelopes import RoundTask
from fedge.errors import ProtocolError
from fedge.secagg.graph import auto_degree
from fedge.secagg.messages import (
    SIGN_TAG,
    Advertise,
    Body,
    MaskedInput,
    Open,
    ShareBundle,
    Signed,
    UnmaskReply,
    read_body,
)
from fedge.secagg.ring import RingSpec, unflatten
from fedge.secagg.server import SecAggServer
from fedge.tensors import TensorSpec
from fedge.topics import Topics
from fedge.transport.base import Cancellable
from fedge.transport.mqtt import publish_packet_size

__all__ = ["SecureRounds"]

log = logging.getLogger(__name__)

_BODIES: dict[str, type[Body]] = {
    "advertise": Advertise,
    "shares": ShareBundle,
    "masked": MaskedInput,
    "reply": UnmaskReply,
}
_PER_DEVICE_BYTES = 512  # bound on a non-vector message: ~ 200 bytes per roster member


class SecureRounds(SyncRounds):
    def __init__(self, parts: RoundParts) -> None:
        super().__init__(parts)
        sa = self.config.secure_aggregation
        assert sa is not None
        assert isinstance(self.strategy, StreamingStrategy | DPFedAvg)
        self.sa = sa
        self.server: SecAggServer | None = None
        self.stage = ""
        self._stage_timer: Cancellable | None = None
        self._stage_started = 0.0
        self._stage_seconds: dict[str, float] = {}
        self._relay_bytes = 0
        self._masked_bytes = 0
        self._spec: TensorSpec = {}
        self._headroom_bits = self._count = 0
        self._result: tuple[np.ndarray, float, tuple[str, ...]] | None = None

    @classmethod
    def updates_topic(cls, topics: Topics) -> str:
        return topics.all_secagg

    # -- stages -----------------------------------------------------------------------------------
    def _began(self, rnd: OpenRound, spec: TensorSpec) -> None:
        sa, c = self.sa, self.config
        n = sa.max_devices or c.target_devices
        ring = RingSpec.for_devices(sa.value_bits, n, sa.clip, sa.weight_cap)
        count = sum(int(np.prod(s)) for s in spec.values()) + 1
        self._headroom_bits, self._count = ring.headroom_bits, count
        dp = isinstance(self.strategy, DPFedAvg)
        opened = Open(rnd.round, rnd.task.nonce, ring, self._l2_clip() if dp else 0.0)
        degree = sa.degree or auto_degree(n)
        self.server = SecAggServer(opened, degree, sa.threshold, count)
        self._spec, self._result = spec, None
        self._stage_seconds, self._relay_bytes, self._masked_bytes = {}, 0, 0
        self._announce(opened)
        self._enter("advertise", sa.advertise_timeout)

    def _announce(self, body: Body) -> None:
        signed = Signed.make(body, self.publisher.signing_key)
        self._relay_bytes += self.session.publish(
            self.parts.topics.secagg_stage, signed.to_bytes(), retain=True
        )

    def _enter(self, stage: str, timeout: float) -> None:
        now = time.time()
        if self.stage:
            self._stage_seconds[self.stage] = now - self._stage_started
        self.stage, self._stage_started = stage, now
        if self._stage_timer is not None:
            self._stage_timer.cancel()
        self._stage_timer = self.parts.loop.call_later(max(0.0, timeout), self._stage_deadline)

    def _stage_deadline(self) -> None:
        if not self.session.connected:
            # Not while the broker is away: on_connected fails the round once it is back.
            self._stage_timer = self.parts.loop.call_later(1.0, self._stage_deadline)
            return
        self._stage_timer = None
        self._next_stage(deadline=True)

    def on_connected(self) -> None:
        if self.round is not None and not self.parts.done.is_set():
            # Stage messages may have been lost both ways while the broker was away, and a
            # stage cannot be replayed: start over with a new round.
            self._fail("broker connection lost mid-round")
        super().on_connected()

    def _next_stage(self, *, deadline: bool = False) -> None:
        """Move on when the stage's deadline came, or when waiting gains nothing."""
        rnd, s = self.round, self.server
        if rnd is None or s is None:
            return
        need = self.config.min_devices
        if self.stage == "advertise":
            if not deadline and not self.presence.all_answered(rnd.task, s.adverts):
                return
            if len(s.adverts) < need:
                return self._fail(f"{len(s.adverts)} of {need} devices advertised keys")
            self._announce(s.roster())
            self._enter("shares", self.sa.share_timeout)
        elif self.stage == "shares":
            if not deadline and self._waiting(set(s.order) - s.shared):
                return
            if len(s.shared) < need:
                return self._fail(f"{len(s.shared)} of {need} devices shared")
            key = self.publisher.signing_key
            for device, box in s.inboxes().items():
                msg = Signed.make(box, key).to_bytes()
                self._relay_bytes += self.session.publish(
                    self.parts.topics.inbox(device), msg, qos=1
                )
            left = rnd.task.deadline - self.sa.unmask_timeout - time.time()
            self._enter("masked", left)
        elif self.stage == "masked":
            if not deadline and self._waiting(s.shared - s.masked):
                return
            if len(s.masked) < need:
                return self._fail(f"{len(s.masked)} of {need} masked inputs")
            self._announce(s.unmask_request())
            self._enter("unmask", self.sa.unmask_timeout)
        elif self.stage == "unmask":
            if s.ready():
                return self._unmask()
            if deadline:
                self._fail(f"cannot unmask: too few shares for {', '.join(s.missing()[:5])}")

    def _waiting(self, unanswered: set[str]) -> bool:
        """Whether a device that has not answered yet is still online (and may answer)."""
        return bool(unanswered & self.presence.online)

    def _unmask(self) -> None:
        s = self.server
        assert s is not None
        assert s.request is not None
        try:
            ring_sum = s.finish()
        except ProtocolError as e:
            return self._fail(str(e))
        values, weight = s.ring.decode_sum(ring_sum)
        if weight <= 0:
            return self._fail("the survivors' weights sum to zero")
        self._result = (values, weight, s.request.survivors)
        self._close_round()

    def _fail(self, why: str) -> None:
        rnd = self.round
        if rnd is not None:
            self.metrics.event("secagg_failed")
            self._fail_round(rnd, f"secagg {self.stage}: {why}")

    def _ended(self) -> None:
        if self._stage_timer is not None:
            self._stage_timer.cancel()
            self._stage_timer = None
        if self.stage:
            self._stage_seconds[self.stage] = time.time() - self._stage_started
        self.stage, self.server = "", None

    def _on_deadline(self) -> None:
        # The round's own deadline backs the stage deadlines: no wait is unbounded.
        if self.round is not None and self.session.connected:
            self._fail(f"round deadline passed in stage {self.stage}")

    def _maybe_close_early(self) -> None:
        self._next_stage()  # a device went offline: the stage may have everyone it can get

    # -- incoming ---------------------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes) -> bool:
        head = f"{self.parts.topics.prefix}/secagg/"
        if not topic.startswith(head):
            return False
        stage, _, device = topic[len(head) :].partition("/")
        size = publish_packet_size(topic, len(payload))
        self.metrics.received(device, size)
        if self.session.current_retained:
            self.session.publish(topic, b"", qos=1, retain=True)  # never parked on the broker
        rnd, s = self.round, self.server
        if stage == "reply" and (s is None or s.request is None or s.ready()):
            return True  # late: the sum was recovered without it (the stage closes when able)
        if rnd is None or s is None or stage not in _BODIES:
            self.intake.reject(rnd, "secagg_stage", f"{topic}: no secure round for it", device)
            return True
        rnd.uplink_bytes += size
        try:
            self._take(stage, device, payload, s)
        except ProtocolError as e:
            self.intake.reject(rnd, e.reason, f"{device} {stage}: {e}", device)
            return True
        if stage == "masked":
            self._masked_bytes += size
        self._next_stage()
        return True

    def _take(self, stage: str, device: str, payload: bytes, s: SecAggServer) -> None:
        bound = (
            s.ring.packed_bytes(s.count) + _PER_DEVICE_BYTES
            if stage == "masked"
            else _PER_DEVICE_BYTES * (len(s.adverts) + 2)
        )
        if len(payload) > bound:
            raise ProtocolError("too_large", f"{len(payload)} bytes > {bound}")
        signed = Signed.from_bytes(payload, self.parts.limits)
        if self.parts.keyring is not None:  # InvalidUpdate is a ProtocolError
            self.parts.keyring.check_update(device, SIGN_TAG + signed.body, signed.sig)
        body: Any = read_body(signed, _BODIES[stage], self.parts.limits)
        if body.device != device:
            raise ProtocolError("schema", f"message of {body.device} on {device}'s topic")
        if stage == "advertise":
            rnd = self.round
            if rnd is not None and not rnd.task.asks(device):
                raise ProtocolError("not_selected", f"{device} was not asked in round {rnd.round}")
            s.add_advert(body, signed)
        elif stage == "shares":
            s.add_shares(body)
        elif stage == "masked":
            s.add_masked(body)
        else:
            s.add_reply(body)

    # -- closing ----------------------------------------------------------------------------------
    def _gather(self, rnd: OpenRound) -> None:
        res, self._result = self._result, None
        if res is None:
            return
        values, weight, survivors = res
        sums = unflatten(values, {k: tuple(v) for k, v in self._spec.items()})
        if isinstance(self.strategy, DPFedAvg):
            # Each survivor clipped to C; quantization adds less than one quantum c/L per
            # coordinate, so one update reaches the sum with norm < C + sqrt(m) c / L.
            m = sum(int(np.prod(s)) for s in self._spec.values())
            bound = self._l2_clip() + math.sqrt(m) * self.sa.clip / (
                (1 << (self.sa.value_bits - 1)) - 1
            )
            self.strategy.fold_clipped_sum(sums, len(survivors), bound)
        else:
            assert isinstance(self.strategy, StreamingStrategy)
            self.strategy.fold_sum(sums, weight, len(survivors))
        rnd.counted = dict.fromkeys(survivors, "masked")
        rnd.folded = [(d, rnd.round, "masked", 0) for d in survivors]
        rnd.samples = round(weight * self.sa.weight_cap)
        self.metrics.accept(len(survivors))

    def _l2_clip(self) -> float:
        assert isinstance(self.strategy, DPFedAvg)
        return float(self.strategy.options.clip_norm)

    def _publish_version(self, rnd: OpenRound) -> dict[str, Any]:
        record = super()._publish_version(rnd)
        record["secagg"] = {
            "survivors": len(rnd.counted),
            "stage_seconds": {k: round(v, 3) for k, v in self._stage_seconds.items()},
            "relay_bytes": self._relay_bytes,
            "masked_bytes": self._masked_bytes,
            "ring_bits": self.sa.value_bits + self._headroom_bits,
            "elements": self._count,
        }
        return record

    def _resume_round(self, task: RoundTask) -> None:
        """Keys and shares of a secure round live in memory only: the round fails."""
        log.warning("secure round %d cannot resume after a restart: failed", task.round)
        self.state.failed_rounds += 1
        self.metrics.event("secagg_failed")
        self.metrics.write({"round": task.round, "failed": "secagg: aggregator restarted"})
        self._checkpoint(counted=())
