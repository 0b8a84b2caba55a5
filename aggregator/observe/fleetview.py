"""What the dashboard and the gauges show, as immutable snapshots of the service's state.

``FleetView`` is a metrics sink (``aggregator.metrics.MetricsSink``) that keeps, on the
service's loop thread, what no other part keeps: per device its rounds counted, last update
size, last update time and rejections by reason; the last ``history`` round records. Its
``snapshot`` reads that together with the presence (statuses), the key ring (revocations) and
the round lifecycle (version, open round), and returns a ``FleetSnapshot``: frozen, so the web
thread can hold and serialise it while the loop goes on. Everything in this module but the
snapshot runs on the loop thread; what it keeps is bounded (``max_devices`` rows, ``history``
rounds, one counter per rejection reason).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from aggregator.metrics import MetricsSink

if TYPE_CHECKING:
    from aggregator.config import AggregatorConfig
    from aggregator.keyring import KeyRing
    from aggregator.lifecycle import RoundLifecycle
    from aggregator.presence import Presence

__all__ = ["DeviceRow", "FleetSnapshot", "FleetView", "OpenRoundRow", "RoundRow"]

DEFAULT_HISTORY = 300
DEFAULT_MAX_DEVICES = 10_000


@dataclass(frozen=True)
class DeviceRow:
    device: str
    state: str  # online | offline | revoked | unannounced (sent updates, never a status)
    last_seen: float | None  # Unix time: its last status or update, whichever is newer
    # The newer of the version its last status names and the base of its newest counted
    # update: an agent announces its version only when it connects.
    model_version: int | None
    rounds_counted: int  # versions its updates went into
    last_update_bytes: int | None  # MQTT packet size of its last update
    rejected: tuple[tuple[str, int], ...]  # (reason, count), most frequent first


@dataclass(frozen=True)
class OpenRoundRow:
    round: int
    base_version: int
    counted: int
    target: int
    min_devices: int
    asked: int | None  # devices the task selects; None: every device
    opened_at: float
    deadline: float


@dataclass(frozen=True)
class RoundRow:
    """One line of metrics.jsonl, the fields the dashboard draws."""

    round: int
    version: int | None  # None: the round failed
    failed: str | None
    devices: int
    accuracy: float | None
    loss: float | None
    train_loss: float | None
    uplink_bytes: int
    model_bytes: int
    task_bytes: int
    seconds: float | None
    ts: float

    @classmethod
    def from_record(cls, r: Mapping[str, Any]) -> RoundRow:
        def num(key: str) -> float | None:
            v = r.get(key)
            return float(v) if isinstance(v, int | float) else None

        return cls(
            round=int(r["round"]),
            version=r.get("version"),
            failed=r.get("failed"),
            devices=int(r.get("devices", 0)),
            accuracy=num("accuracy"),
            loss=num("loss"),
            train_loss=num("train_loss"),
            uplink_bytes=int(r.get("uplink_bytes", 0)),
            model_bytes=int(r.get("model_bytes", 0)),
            task_bytes=int(r.get("task_bytes", 0)),
            seconds=num("seconds"),
            ts=float(r.get("ts", 0.0)),
        )


@dataclass(frozen=True)
class FleetSnapshot:
    fleet: str
    mode: str
    strategy: str
    codec: str
    version: int
    rounds_goal: int  # config ``rounds`` (0: forever)
    failed_rounds: int
    devices: tuple[DeviceRow, ...]
    open_round: OpenRoundRow | None
    history: tuple[RoundRow, ...]
    accepted: int
    rejected: tuple[tuple[str, int], ...]
    uplink_bytes: int  # every update packet received since start
    taken_at: float = field(default_factory=time.time)

    def count(self, state: str) -> int:
        return sum(d.state == state for d in self.devices)

    @property
    def last_published(self) -> RoundRow | None:
        return next((r for r in reversed(self.history) if r.version is not None), None)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _DeviceStats:
    rounds_counted: int = 0
    last_update_bytes: int | None = None
    last_update_at: float | None = None
    trained_on: int | None = None  # base version of its newest counted update
    rejected: Counter[str] = field(default_factory=Counter)


class FleetView(MetricsSink):
    """A metrics sink that remembers per device and per round what the dashboard shows."""

    def __init__(
        self, *, history: int = DEFAULT_HISTORY, max_devices: int = DEFAULT_MAX_DEVICES
    ) -> None:
        self._devices: dict[str, _DeviceStats] = {}
        self._max_devices = max_devices
        self._history: deque[RoundRow] = deque(maxlen=history)
        self.accepted = 0
        self.rejected: Counter[str] = Counter()
        self.uplink_bytes = 0

    def _stats(self, device: str) -> _DeviceStats | None:
        st = self._devices.get(device)
        if st is None and len(self._devices) < self._max_devices:
            st = self._devices[device] = _DeviceStats()
        return st  # None past max_devices: a flood of made-up ids grows nothing

    # -- MetricsSink ----------------------------------------------------------------------------
    def reject(self, reason: str, count: int = 1, *, device: str | None = None) -> None:
        self.rejected[reason] += count
        st = self._stats(device) if device is not None else None
        if st is not None:
            st.rejected[reason] += count

    def accept(
        self,
        count: int = 1,
        *,
        device: str | None = None,
        staleness: int = 0,
        base_version: int | None = None,
    ) -> None:
        self.accepted += count
        st = self._stats(device) if device is not None else None
        if st is not None and base_version is not None:
            st.trained_on = max(st.trained_on or 0, base_version)

    def received(self, device: str, packet_bytes: int) -> None:
        self.uplink_bytes += packet_bytes
        st = self._stats(device)
        if st is not None:
            st.last_update_bytes = packet_bytes
            st.last_update_at = time.time()

    def write(self, record: Mapping[str, Any]) -> None:
        self._history.append(RoundRow.from_record(record))
        # async mode names "device@round": a device counts once per version either way.
        for key in {k.partition("@")[0] for k in record.get("counted", {})}:
            st = self._stats(key)
            if st is not None:
                st.rounds_counted += 1

    # -- the snapshot ---------------------------------------------------------------------------
    def snapshot(
        self,
        *,
        config: AggregatorConfig,
        presence: Presence,
        rounds: RoundLifecycle,
        keyring: KeyRing | None,
    ) -> FleetSnapshot:
        """Everything the web thread may read, copied (call on the loop thread)."""
        rows = []
        for d in sorted(presence.known | self._devices.keys()):
            st = self._devices.get(d) or _DeviceStats()
            status = presence.statuses.get(d)
            if keyring is not None and keyring.is_revoked(d):
                state = "revoked"
            elif d in presence.online:
                state = "online"
            elif d in presence.known:
                state = "offline"
            else:
                state = "unannounced"
            seen = [t for t in (status.ts if status else None, st.last_update_at) if t]
            rows.append(
                DeviceRow(
                    device=d,
                    state=state,
                    last_seen=max(seen) if seen else None,
                    model_version=_newest(status.version if status else None, st.trained_on),
                    rounds_counted=st.rounds_counted,
                    last_update_bytes=st.last_update_bytes,
                    rejected=tuple(st.rejected.most_common()),
                )
            )
        rnd = rounds.round
        open_row = None
        if rnd is not None:
            task = rnd.task
            open_row = OpenRoundRow(
                round=task.round,
                base_version=task.base_version,
                counted=rounds.strategy.count,
                target=rounds.target(),
                min_devices=config.min_devices,
                asked=len(task.selected) if task.selected is not None else None,
                opened_at=rnd.opened_at,
                deadline=task.deadline,
            )
        return FleetSnapshot(
            fleet=config.fleet,
            mode="sharded" if config.shard_workers else config.mode,
            strategy=config.strategy,
            codec=config.codec,
            version=rounds.state.version,
            rounds_goal=config.rounds,
            failed_rounds=rounds.state.failed_rounds,
            devices=tuple(rows),
            open_round=open_row,
            history=tuple(self._history),
            accepted=self.accepted,
            rejected=tuple(self.rejected.most_common()),
            uplink_bytes=self.uplink_bytes,
        )


def _newest(*versions: int | None) -> int | None:
    known = [v for v in versions if v is not None]
    return max(known) if known else None
