"""The aggregator's side of a secure round: collect, relay, sum masked inputs, recover the sum.

    s = SecAggServer(open_msg, degree, threshold_fraction)
    s.add_advert(device, signed)  ...  s.roster()        -> Roster       (stage 1 closes)
    s.add_shares(device, bundle)  ...  s.inboxes()       -> {device: Inbox} (stage 2 closes)
    s.add_masked(device, input)   ...  s.unmask_request() -> Unmask      (stage 3 closes)
    s.add_reply(device, reply)    ...  s.ready(); s.finish() -> ring sum (stage 4 closes)

It holds only what it must: public keys, sealed shares it cannot open (until relayed), the
running ring sum of masked inputs (O(model), never an individual input) and the shares the
survivors return. ``finish`` removes the survivors' self masks and the pairwise masks the
survivors share with dropped devices, and returns the sum of the survivors' ring vectors.
Every ``add_*`` refuses with ``ProtocolError`` and changes nothing.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from fedge.errors import ProtocolError
from fedge.secagg import shamir
from fedge.secagg.crypto import PAIR_INFO, agree
from fedge.secagg.graph import effective_degree, neighbours, threshold_for
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
)
from fedge.secagg.prg import expand
from fedge.secagg.ring import unpack_bits

__all__ = ["SecAggServer"]


class SecAggServer:
    def __init__(self, opened: Open, degree: int, threshold: float, count: int) -> None:
        """``count``: ring elements of every input (parameters + 1)."""
        self.opened = opened
        self.round = opened.round
        self.ring = opened.ring
        self.count = count
        self._degree = degree
        self._fraction = threshold
        self.adverts: dict[str, tuple[Advertise, Signed]] = {}
        self.order: list[str] = []
        self.graph: dict[str, tuple[str, ...]] = {}
        self.threshold = 0
        self.sealed: dict[str, dict[str, bytes]] = defaultdict(dict)  # recipient->sender->sealed
        self.shared: set[str] = set()  # U1
        self.masked: set[str] = set()  # U2
        self._sum = np.zeros(count, np.uint64)
        self.request: Unmask | None = None
        self._inboxed = False
        self.seed_shares: dict[str, dict[int, int]] = defaultdict(dict)
        self.key_shares: dict[str, dict[int, int]] = defaultdict(dict)
        self.replied: set[str] = set()

    # -- stage 1 ------------------------------------------------------------------------------
    def add_advert(self, adv: Advertise, signed: Signed) -> None:
        if self.order or adv.round != self.round:
            raise ProtocolError("secagg_stage", f"advert of round {adv.round} out of stage")
        if adv.device in self.adverts:
            raise ProtocolError("duplicate", f"{adv.device} advertised twice")
        if len(self.adverts) >= self.ring.max_inputs:
            raise ProtocolError("secagg_full", f"the ring holds {self.ring.max_inputs} inputs")
        self.adverts[adv.device] = (adv, signed)

    def roster(self) -> Roster:
        self.order = sorted(self.adverts)
        k = effective_degree(len(self.order), self._degree)
        self.graph = neighbours(self.order, self.opened.nonce, k)
        self.threshold = threshold_for(k, self._fraction)
        signed = tuple(self.adverts[d][1] for d in self.order)
        return Roster(self.round, k, self.threshold, signed)

    # -- stage 2 ------------------------------------------------------------------------------
    def add_shares(self, b: ShareBundle) -> None:
        if not self.order or self.request is not None or b.round != self.round:
            raise ProtocolError("secagg_stage", f"shares of round {b.round} out of stage")
        if b.device not in self.graph:
            raise ProtocolError("secagg_stage", f"{b.device} is not in the roster")
        if b.device in self.shared:
            raise ProtocolError("duplicate", f"{b.device} shared twice")
        if sorted(d for d, _ in b.sealed) != list(self.graph[b.device]):
            raise ProtocolError("secagg", f"{b.device} did not seal one share per neighbour")
        for recipient, sealed in b.sealed:
            self.sealed[recipient][b.device] = sealed
        self.shared.add(b.device)

    def inboxes(self) -> dict[str, Inbox]:
        """For each device that shared, the shares sealed to it by neighbours that shared."""
        self._inboxed = True
        return {
            d: Inbox(
                self.round,
                d,
                tuple(
                    sorted((s, c) for s, c in self.sealed.get(d, {}).items() if s in self.shared)
                ),
            )
            for d in sorted(self.shared)
        }

    # -- stage 3 ------------------------------------------------------------------------------
    def add_masked(self, m: MaskedInput) -> None:
        if not self._inboxed or self.request is not None:
            raise ProtocolError("secagg_stage", "masked input out of stage")
        if m.round != self.round or m.device not in self.shared:
            raise ProtocolError("secagg_stage", f"{m.device} did not share in round {m.round}")
        if m.device in self.masked:
            raise ProtocolError("duplicate", f"{m.device} sent two masked inputs")
        if m.count != self.count:
            raise ProtocolError("shape", f"masked input has {m.count} elements, not {self.count}")
        self.ring.add(self._sum, unpack_bits(m.data, self.ring.bits, m.count))
        self.masked.add(m.device)

    def unmask_request(self) -> Unmask:
        survivors = tuple(sorted(self.masked))
        self.request = Unmask(self.round, survivors, tuple(sorted(self.shared - self.masked)))
        return self.request

    # -- stage 4 ------------------------------------------------------------------------------
    def add_reply(self, r: UnmaskReply) -> None:
        req = self.request
        if req is None or r.round != self.round or r.device not in self.masked:
            raise ProtocolError("secagg_stage", f"unmask reply of {r.device} out of stage")
        if r.device in self.replied:
            raise ProtocolError("duplicate", f"{r.device} replied twice")
        x = self.order.index(r.device) + 1
        parsed = []
        for owner, raw in r.seeds:
            if owner not in req.survivors or not self._holds(r.device, owner):
                raise ProtocolError("secagg", f"{r.device} sent a seed share of {owner}")
            parsed.append((self.seed_shares, owner, shamir.decode_share(raw)))
        for owner, raw in r.keys:
            if owner not in req.dropped or not self._holds(r.device, owner):
                raise ProtocolError("secagg", f"{r.device} sent a key share of {owner}")
            parsed.append((self.key_shares, owner, shamir.decode_share(raw)))
        for table, owner, (sx, sy) in parsed:
            if sx != x:
                raise ProtocolError("secagg", f"{r.device} sent a share of another point")
            table[owner][sx] = sy
        self.replied.add(r.device)

    def _holds(self, holder: str, owner: str) -> bool:
        """Whether ``holder`` holds a share of ``owner``'s secrets: its neighbours and itself."""
        return holder == owner or holder in self.graph[owner]

    def missing(self) -> list[str]:
        """Devices whose secret cannot be recovered yet (too few shares)."""
        req = self.request
        if req is None:
            return ["(no unmask request)"]
        t = self.threshold
        out = [d for d in req.survivors if len(self.seed_shares[d]) < t]
        out += [d for d in self._needed_keys() if len(self.key_shares[d]) < t]
        return out

    def _needed_keys(self) -> list[str]:
        """Dropped devices whose pairwise masks some survivor added."""
        assert self.request is not None
        return [d for d in self.request.dropped if set(self.graph[d]) & self.masked]

    def ready(self) -> bool:
        return not self.missing()

    def finish(self) -> np.ndarray:
        """The ring sum of the survivors' inputs; ``ProtocolError`` if a secret is missing."""
        missing = self.missing()
        if missing:
            raise ProtocolError("secagg", f"too few shares to unmask {', '.join(missing[:5])}")
        ring, n, t = self.ring, self.count, self.threshold
        total = self._sum.copy()
        for d in sorted(self.masked):
            b = shamir.combine(self.seed_shares[d].items(), t)
            ring.sub(total, expand(b, n, ring.bits))
        nonce = self.opened.nonce
        for j in self._needed_keys():
            s_sk = shamir.combine(self.key_shares[j].items(), t)
            for i in sorted(set(self.graph[j]) & self.masked):
                # i added +PRG(s_ij) when i < j, else -PRG(s_ij): take it back out.
                seed = agree(s_sk, self.adverts[i][0].s_pk, nonce, PAIR_INFO)
                (ring.sub if i < j else ring.add)(total, expand(seed, n, ring.bits))
        return total
