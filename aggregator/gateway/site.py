"""A site gateway: the shard worker of one site, on the site broker, bridged to the centre.

It takes its devices' updates as every shard worker does (``ShardWorker``: the shared intake,
the fsynced journal before the receipt and the ack, a clipped partial sum), with three
differences that make it fit a wide-area link:

- **One dense partial per round.** The central reducer polls every ``shard_poll`` seconds;
  the gateway answers those polls with a summary (who is counted, no tensors) and sends the
  sums once, in answer to the final request that seals the round (``_dense``).
- **A round can close without the site.** A site cut off from the centre keeps taking,
  journaling and receipting its devices' updates. When the link returns the central
  aggregator's queued messages arrive in order: a final request naming other gateways, or a
  newer task without a final request that asked this gateway, means the round closed without
  this site. Every update journaled for it then gets a *late* receipt (``Receipt.late``) and
  is dropped with its journal; if the round is still open, they count as usual. An update is
  therefore either in exactly one partial the round closed on or told it came too late.
- **A round can fail after the seal.** The centre may still fail a round whose final request
  asked this gateway (quorum not met on the final merge, an aggregate that does not finish):
  then no model follows it, and the next task trains the same ``base_version`` the sealed
  round did. Seeing that, the gateway tells the round's devices their updates are in no
  version (late receipts), as for a round closed without the site. A closed round always
  publishes a new version before the next task, so a newer ``base_version`` means counted.
- **The seal is on disk** (``seal.json``: the round, asked or left out, and the sealed
  round's base version): after a restart the gateway knows whether the round its journal
  holds was sealed asking it (counted, unless the next task shows it failed) or left out.

Runs on the mux thread, like every shard worker.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from aggregator.sharded.partials import PartialRequest
from aggregator.sharded.worker import ShardWorker
from fedge.envelopes import ModelUpdate, Receipt
from fedge.errors import ProtocolError
from fedge.support.fsutil import atomic_write

__all__ = ["SiteGateway"]

log = logging.getLogger(__name__)

_ASKED = "asked"  # the final request of the round asked this gateway: counted
_LEFT_OUT = "left_out"  # a later final request named others: late
_FAILED = "failed"  # asked, but the centre failed the round after the seal: late


class SiteGateway(ShardWorker):
    """``ShardWorker`` + summaries before the seal + late receipts for rounds closed without
    the site. Build it like a ``ShardWorker`` from ``GatewayConfig.worker_config()``."""

    late = 0  # updates told they came too late, over the gateway's life
    dense_sent = 0  # dense partials sent (one per round the gateway was asked to seal)

    @property
    def _seal_path(self) -> Path:
        return Path(self.config.state_dir) / "seal.json"

    def _seal(self) -> tuple[int, str] | None:
        try:
            raw = json.loads(self._seal_path.read_text())
            return int(raw["round"]), str(raw["final"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _sealed_base(self) -> int | None:
        """The base version of the round ``seal.json`` records (None: not recorded)."""
        try:
            return int(json.loads(self._seal_path.read_text())["base_version"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _record_seal(self, round_id: int, final: str, base_version: int | None = None) -> None:
        record = {"round": round_id, "final": final, "base_version": base_version}
        atomic_write(self._seal_path, json.dumps(record).encode())

    # -- the ShardWorker hooks -------------------------------------------------------------
    def _dense(self, final: bool) -> bool:
        self.dense_sent += final
        return final

    def _on_sealed(self, round_id: int) -> None:
        base = self.round.task.base_version if self.round is not None else None
        self._record_seal(round_id, _ASKED, base)

    def _not_asked(self, req: PartialRequest) -> None:
        rnd = self.round
        if not req.final or rnd is None or req.round != rnd.round:
            return
        if self._seal() == (rnd.round, _LEFT_OUT):
            return  # told already (a repeated request after a restart)
        # Sealed without this site: refuse its later updates, tell the journaled ones; then
        # record it (a crash in between tells them twice, never not at all).
        self._sealed = rnd.round
        self._tell_late(rnd.round)
        self._record_seal(rnd.round, _LEFT_OUT)

    def _settle(self, new_round: int) -> None:
        seal = self._seal()
        for r in self.journal.rounds():
            if r >= new_round:
                continue
            if seal == (r, _ASKED) and self._failed_after_seal():
                # Sealed asking this gateway, but no version came of it (module docstring).
                self._tell_late(r, why="failed at the centre after its seal")
                self._record_seal(r, _FAILED, self._sealed_base())
                continue
            if seal is not None and seal[0] == r:
                continue  # counted (asked), or told already (left out, failed)
            # No final request asked this gateway for round r: it closed (or failed) without it.
            self._tell_late(r)

    def _failed_after_seal(self) -> bool:
        """The newer task trains the base version of the round sealed asking this gateway:
        that round published no model, so it failed after the seal."""
        base, task = self._sealed_base(), self._task
        return base is not None and task is not None and task.base_version == base

    def _maybe_open(self) -> None:
        opened = self.round
        super()._maybe_open()
        rnd = self.round
        if rnd is not None and rnd is not opened:
            seal = self._seal()
            if seal is not None and seal[0] == rnd.round:
                self._sealed = rnd.round  # restarted after the seal: later updates are late

    # -- late receipts -----------------------------------------------------------------------
    def _tell_late(self, round_id: int, why: str = "closed without this site") -> None:
        """A late receipt for every update journaled for ``round_id`` (verified before it was
        journaled); the devices keep no copy of it (their outbox dropped it at the receipt)."""
        told = 0
        for device, payload in self.journal.records(round_id):
            if device in self._excluded:
                continue  # counted by another worker
            try:
                upd = ModelUpdate.from_bytes(payload, self.limits)
            except ProtocolError:
                continue
            receipt = Receipt(device, upd.round, upd.update_id, late=True)
            self.session.publish(self.topics.receipt(device), receipt.to_bytes(), qos=1)
            self.intake.metrics.reject("late", device=device)
            told += 1
        if told:
            self.late += told
            log.warning(
                "%s: round %d %s: %d updates told they came too late",
                self.name,
                round_id,
                why,
                told,
            )
