"""A device's secure rounds over its session (fedge.secagg; protocol §16).

The agent trains as usual; what differs is the upload. ``SecAggDevice`` follows the stage
messages on ``{p}/secagg/stage`` and its ``{p}/inbox/{device}``: it advertises keys once it
holds both the round's task and its ``Open`` (same round, same nonce, the task asks it),
sends sealed shares when the roster comes, and sends its masked input once it has both its
inbox and its trained delta; then it answers the unmask request. Aggregator messages are
checked against the aggregator's key when the agent has one.

A device that has seen a secure round (or is configured ``secure_only``) never sends a plain
update again: a result trained before its round's ``Open`` arrived waits for it. Keys and
shares live in memory for one round; a restarted device drops out of that round, which the
protocol tolerates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_agent.privacy import LocalDP
from fedge.envelopes import DeviceState, DeviceStatus, RoundTask
from fedge.errors import InvalidValue, ProtocolError
from fedge.identity import SigningKey, VerifyKey
from fedge.limits import Limits
from fedge.secagg.client import SecAggClient
from fedge.secagg.messages import Body, Inbox, Open, Roster, Signed, Unmask, read_body
from fedge.secagg.ring import flatten
from fedge.topics import Topics

__all__ = ["SecAggDevice", "SecAggOptions"]

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes, bool], None]  # topic, payload, retain


@dataclass(frozen=True)
class SecAggOptions:
    """``secure_only``: never send a plain update. ``vanish_after(round)``: the stage after
    which this device stops answering in that round ("advertise", "shares", "masked"), or
    None (simulated dropouts: the device then says it is offline, as its will would on a lost
    connection, and online again at the next round's task)."""

    secure_only: bool = False
    vanish_after: Callable[[int], str | None] | None = None


_STAGE_BODIES: dict[str, type[Body]] = {"open": Open, "roster": Roster, "unmask": Unmask}


class SecAggDevice:
    def __init__(
        self,
        device: str,
        topics: Topics,
        publish: Publish,
        *,
        limits: Limits,
        seed: int,
        signing_key: SigningKey | None,
        aggregator_key: VerifyKey | None,
        options: SecAggOptions | None = None,
    ) -> None:
        self.device = device
        self.topics = topics
        self._publish = publish
        self._limits = limits
        self._seed = seed
        self._key = signing_key
        self._agg_key = aggregator_key
        self.options = options or SecAggOptions()
        self.seen_secure = False
        self.task: RoundTask | None = None
        self.opened: Open | None = None
        self.client: SecAggClient | None = None
        self._pending: tuple[int, np.ndarray, int] | None = None  # round, flat delta, samples
        self._vanish: str | None = None
        self._offline_round = 0  # the round a simulated dropout said it went offline in

    @property
    def subscriptions(self) -> list[str]:
        return [self.topics.secagg_stage, self.topics.inbox(self.device)]

    def takes(self, t: RoundTask) -> bool:
        """Whether round ``t``'s result goes through secure aggregation."""
        return self.options.secure_only or self.seen_secure

    # -- from the agent -------------------------------------------------------------------------
    def on_task(self, t: RoundTask) -> None:
        self.task = t
        self._back(t.round)
        self._start()

    def submit(
        self,
        t: RoundTask,
        base: Mapping[str, np.ndarray],
        weights: Mapping[str, Any],
        n: int,
        local_dp: LocalDP | None = None,
    ) -> None:
        """The trained weights of round ``t``: masked and sent once the inbox is in. With
        ``local_dp`` the delta is clipped and noised first, as a plain upload's would be."""
        delta = {k: np.asarray(weights[k], np.float64) - base[k] for k in base}
        if local_dp is not None:
            delta = dict(local_dp.privatize(delta, None))
        self._pending = (t.round, flatten(delta), int(n))
        self._send_masked()

    # -- incoming -------------------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes) -> bool:
        """A secure-round message (True), else False. ``ProtocolError`` for a bad one."""
        if topic == self.topics.secagg_stage:
            if payload:
                self._on_stage(self._read(payload))
            return True
        if topic == self.topics.inbox(self.device):
            c = self.client
            box = read_body(self._read(payload), Inbox, self._limits)
            if c is not None and box.round == c.round and self._live("shares"):
                self._guard(c.receive, box)
                self._send_masked()
            return True
        return False

    def _read(self, payload: bytes) -> Signed:
        if len(payload) > self._limits.max_payload_bytes:
            raise ProtocolError("too_large", "secagg message over the payload limit")
        signed = Signed.from_bytes(payload, self._limits)
        if self._agg_key is not None and not signed.verified_by(self._agg_key):
            raise ProtocolError("bad_signature", "secagg message not signed by the aggregator")
        return signed

    def _on_stage(self, signed: Signed) -> None:
        from fedge.wire import unpack_map

        kind = unpack_map(signed.body, self._limits, what="secagg body").get("type")
        cls = _STAGE_BODIES.get(kind) if isinstance(kind, str) else None
        if cls is None:
            raise ProtocolError("schema", f"unknown secagg stage {kind!r}")
        body: Any = read_body(signed, cls, self._limits)
        # Any stage message (a restarted device may first see a roster or an unmask request)
        # says the fleet runs secure rounds: from now on no plain update leaves this device.
        self.seen_secure = True
        if isinstance(body, Open):
            self._back(body.round)
            if self.opened is None or body.round > self.opened.round:
                self.opened = body
                self._start()
            return
        if isinstance(body, Unmask) and body.round == self._offline_round:
            self._back(body.round + 1)  # the round it vanished from is closing: back for the next
        c = self.client
        if c is None or body.round != c.round:
            return
        if isinstance(body, Roster) and not c.peers and self._live("advertise"):
            self._send("shares", self._guard(c.share, body))
        elif isinstance(body, Unmask) and c.sent_masked and not c.replied and self._live("masked"):
            self._send("reply", self._guard(c.unmask, body))

    # -- the steps ------------------------------------------------------------------------------
    def _start(self) -> None:
        t, o = self.task, self.opened
        if t is None or o is None or t.round != o.round:
            return
        if (self.client is not None and self.client.round == o.round) or not t.asks(self.device):
            return
        if o.nonce != t.nonce:
            log.warning("%s: secagg open of round %d: another nonce", self.device, o.round)
            return
        self.client = SecAggClient(self.device, o, self._key, limits=self._limits)
        vanish = self.options.vanish_after
        self._vanish = vanish(o.round) if vanish is not None else None
        self._send("advertise", self.client.advertise())

    def _send_masked(self) -> None:
        c, p = self.client, self._pending
        if c is None or p is None or p[0] != c.round or c.held is None or c.sent_masked:
            return
        _, delta, n = p
        self._pending = None
        if c.opened.l2_clip > 0:  # central DP on the sum: clipped, equally weighted
            norm = float(np.linalg.norm(delta))
            if norm > c.opened.l2_clip:
                delta = delta * (c.opened.l2_clip / norm)
            n = c.ring.weight_cap
        rng = np.random.default_rng([self._seed, c.round])
        try:
            values = c.ring.encode(delta, n, rng)
        except InvalidValue as e:  # a diverged local model: nothing to send this round
            log.error("%s: round %d: not sent: %s", self.device, c.round, e)
            self.client = None
            return
        self._send("masked", self._guard(c.masked, values))

    def _live(self, after: str) -> bool:
        """False once this device has (in simulation) vanished after stage ``after``."""
        order = ("advertise", "shares", "masked")
        if self._vanish is None or order.index(after) < order.index(self._vanish):
            return True
        if not self._offline_round and self.client is not None:
            self._offline_round = self.client.round
            self._status(DeviceState.OFFLINE)
        return False

    def _back(self, round_id: int) -> None:
        """A simulated dropout is back at the next round (its Open or task, whichever first)."""
        if self._offline_round and round_id > self._offline_round:
            self._offline_round = 0
            self._status(DeviceState.ONLINE)

    def _status(self, state: DeviceState) -> None:
        msg = DeviceStatus(self.device, state, None, time.time()).to_bytes()
        self._publish(self.topics.status(self.device), msg, True)

    def _guard(self, step: Callable[[Any], Any], arg: Any) -> Any:
        try:
            return step(arg)
        except ProtocolError:
            self.client = None  # we drop out of this round: nothing more is sent
            raise

    def _send(self, stage: str, signed: Signed | None) -> None:
        if signed is not None:
            self._publish(self.topics.secagg(stage, self.device), signed.to_bytes(), False)
