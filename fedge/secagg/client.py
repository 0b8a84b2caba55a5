"""One device's side of a secure round, as a pure state machine (no MQTT, no clock).

    c = SecAggClient(device, open_msg, signing_key)
    c.advertise()                  -> Signed Advertise        (stage 1)
    c.share(roster)                -> Signed ShareBundle      (stage 2)
    c.receive(inbox)                                         (the shares sealed to us)
    c.masked(ring_values)          -> Signed MaskedInput      (stage 3)
    c.unmask(request)              -> Signed UnmaskReply      (stage 4)

Each step refuses (``ProtocolError``) what would leak: a roster without our own advert, an
unmask request naming a device both survivor and dropped or naming us dropped, a second
request. Keys and seeds live in memory for this round only: a device that restarts drops out.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from fedge.errors import ProtocolError
from fedge.identity import SigningKey
from fedge.limits import DEFAULT_LIMITS, Limits
from fedge.secagg import shamir
from fedge.secagg.crypto import PAIR_INFO, SHARE_INFO, KeyPair, agree, open_share, seal_share
from fedge.secagg.graph import neighbours
from fedge.secagg.messages import (
    Advertise,
    Inbox,
    MaskedInput,
    Open,
    Roster,
    ShareBundle,
    Signed,
    Unmask,
    UnmaskReply,
    read_body,
)
from fedge.secagg.prg import expand
from fedge.secagg.ring import pack_bits

__all__ = ["SecAggClient", "read_roster"]

# Verifies a device's advert signature; None: trust the roster as the aggregator sent it.
AdvertCheck = Callable[[str, Signed], bool]


def read_roster(
    roster: Roster, round_id: int, limits: Limits, check: AdvertCheck | None = None
) -> dict[str, Advertise]:
    """The roster's adverts by device, each of this round, unique, and signed when ``check``."""
    out: dict[str, Advertise] = {}
    for s in roster.adverts:
        adv = read_body(s, Advertise, limits)
        if adv.round != round_id or adv.device in out:
            raise ProtocolError("secagg", f"roster advert of {adv.device} is stale or repeated")
        if check is not None and not check(adv.device, s):
            raise ProtocolError("bad_signature", f"roster advert of {adv.device} is not signed")
        out[adv.device] = adv
    return out


class SecAggClient:
    def __init__(
        self,
        device: str,
        opened: Open,
        signing_key: SigningKey | None = None,
        *,
        limits: Limits = DEFAULT_LIMITS,
        advert_check: AdvertCheck | None = None,
    ) -> None:
        self.device = device
        self.opened = opened
        self.round = opened.round
        self.ring = opened.ring
        self._key = signing_key
        self._limits = limits
        self._check = advert_check
        self._c = KeyPair.generate()
        self._s = KeyPair.generate()
        self._b = os.urandom(32)  # self-mask seed
        self.peers: dict[str, Advertise] = {}
        self.neighbours: tuple[str, ...] = ()
        self.threshold = 0
        self.held: dict[str, tuple[bytes, bytes]] | None = None  # sender -> (seed, key) share
        self._own = (b"", b"")  # our share of our own secrets (seed, key)
        self.sent_masked = False
        self.replied = False

    def _sign(self, body: Advertise | ShareBundle | MaskedInput | UnmaskReply) -> Signed:
        return Signed.make(body, self._key)

    def advertise(self) -> Signed:
        return self._sign(Advertise(self.round, self.device, self._c.public, self._s.public))

    def share(self, roster: Roster) -> Signed:
        if roster.round != self.round or self.peers:
            raise ProtocolError("secagg", "roster of another round, or a second roster")
        peers = read_roster(roster, self.round, self._limits, self._check)
        mine = peers.get(self.device)
        if mine is None or (mine.c_pk, mine.s_pk) != (self._c.public, self._s.public):
            raise ProtocolError("secagg", "the roster does not carry our advert")
        order = sorted(peers)
        graph = neighbours(order, self.opened.nonce, roster.degree)
        self.neighbours = graph[self.device]
        if not 1 <= roster.threshold <= len(self.neighbours):
            raise ProtocolError("secagg", f"threshold {roster.threshold} out of range")
        self.peers, self.threshold = peers, roster.threshold
        # Holders: the neighbours and this device itself (its own share stays here).
        x_self = order.index(self.device) + 1
        xs = [order.index(d) + 1 for d in self.neighbours]
        seed_sh = shamir.split(self._b, [*xs, x_self], self.threshold)
        key_sh = shamir.split(self._s.private, [*xs, x_self], self.threshold)
        self._own = (
            shamir.encode_share(x_self, seed_sh[x_self]),
            shamir.encode_share(x_self, key_sh[x_self]),
        )
        sealed = []
        for d, x in zip(self.neighbours, xs, strict=True):
            k = agree(self._c.private, peers[d].c_pk, self.opened.nonce, SHARE_INFO)
            plain = shamir.encode_share(x, seed_sh[x]) + shamir.encode_share(x, key_sh[x])
            sealed.append((d, seal_share(k, self.round, self.device, d, plain)))
        return self._sign(ShareBundle(self.round, self.device, tuple(sealed)))

    def receive(self, inbox: Inbox) -> None:
        """Open the shares sealed to us; their senders are whom we mask with."""
        if inbox.round != self.round or inbox.device != self.device or not self.peers:
            raise ProtocolError("secagg", "inbox of another round or device, or before sharing")
        if self.held is not None:
            raise ProtocolError("secagg", "a second inbox")
        x_self = sorted(self.peers).index(self.device) + 1
        held = {}
        for sender, sealed in inbox.sealed:
            if sender not in self.neighbours:
                raise ProtocolError("secagg", f"share from {sender}, not a neighbour")
            k = agree(self._c.private, self.peers[sender].c_pk, self.opened.nonce, SHARE_INFO)
            plain = open_share(k, self.round, sender, self.device, sealed)
            seed, key = plain[: shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES :]
            if shamir.decode_share(seed)[0] != x_self or shamir.decode_share(key)[0] != x_self:
                raise ProtocolError("secagg", f"share from {sender} is not for our point")
            held[sender] = (seed, key)
        self.held = held

    def mask(self, values: np.ndarray) -> np.ndarray:
        """``values`` (ring elements) + self mask + pairwise masks with the inbox's senders."""
        if self.held is None:
            raise ProtocolError("secagg", "no inbox yet")
        ring = self.ring
        y = np.asarray(values, np.uint64).copy()
        ring.add(y, expand(self._b, y.size, ring.bits))
        for d in self.held:
            seed = agree(self._s.private, self.peers[d].s_pk, self.opened.nonce, PAIR_INFO)
            m = expand(seed, y.size, ring.bits)
            (ring.add if self.device < d else ring.sub)(y, m)
        return y

    def masked(self, values: np.ndarray) -> Signed:
        if self.sent_masked:
            raise ProtocolError("secagg", "masked input already sent")
        y = self.mask(values)
        self.sent_masked = True
        data = pack_bits(y, self.ring.bits)
        return self._sign(MaskedInput(self.round, self.device, int(y.size), data))

    def unmask(self, req: Unmask) -> Signed:
        if req.round != self.round or self.held is None or not self.sent_masked:
            raise ProtocolError("secagg", "unmask request of another round, or too early")
        if self.replied:
            raise ProtocolError("secagg", "a second unmask request")
        if self.device not in req.survivors:
            raise ProtocolError("secagg", "we sent our input but are not named a survivor")
        survivors, dropped = set(req.survivors), set(req.dropped)
        if len(survivors & set(self.neighbours)) + 1 < self.threshold:
            raise ProtocolError("secagg", "fewer survivors than the threshold")
        self.replied = True
        held = {**self.held, self.device: self._own}
        seeds = tuple((d, s) for d, (s, _) in sorted(held.items()) if d in survivors)
        keys = tuple((d, k) for d, (_, k) in sorted(self.held.items()) if d in dropped)
        return self._sign(UnmaskReply(self.round, self.device, seeds, keys))
