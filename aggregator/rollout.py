"""The rollout controller: which version devices *serve*, released in stages (protocol §5.8,
docs/operations.md "Rollouts").

The aggregator publishes, retained and signed with its model key, the release manifest on
``{p}/release``, the manifest's version on ``{p}/release/candidate`` and its previous (last
known good) version on ``{p}/release/stable`` (``GlobalModel`` messages from the registry).
A rollout (``start``) begins at stage 0; devices of the stage's cohort shadow-evaluate the
candidate and report in their statuses (``on_status``); ``rollout_state.decide`` advances
the stage, promotes after the last one, or rolls back automatically (a ``direct`` manifest
back to the previous version) on a regression or a candidate a device could not verify or
load. ``promote`` advances a stage by hand, ``abort`` goes back to the previous version,
``rollback`` releases any kept version to every device at once.

Every step is checkpointed (``RolloutState``) before its manifest is published, logged,
appended to ``STATE_DIR/rollout.jsonl`` and counted as a metrics event (``rollout_*``). A
restart resumes: the manifest is re-published at every (re)connect and the reports come
back with the devices' retained statuses. Operators reach the controller through request
files in the aggregator's state directory (``aggregator.rollout_requests``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from aggregator.metrics import MetricsSink
from aggregator.presence import Presence
from aggregator.registry import ModelRegistry
from aggregator.rollout_state import Active, Decision, RolloutState, decide, status_of
from fedge.envelopes import (
    DeviceStatus,
    GlobalModel,
    ModelArch,
    ReleaseManifest,
    ReleaseMode,
    cohort_bound,
    in_cohort,
)
from fedge.errors import ConfigError, ProtocolError
from fedge.identity import SigningKey
from fedge.topics import Topics
from fedge.transport.base import RoleSession
from fedge.transport.mqtt import checked_packet_size

__all__ = ["DEFAULT_STAGES", "RolloutController"]

log = logging.getLogger(__name__)

DEFAULT_STAGES = (0.05, 0.25, 1.0)


class RolloutController:
    def __init__(
        self,
        state_dir: Path,
        *,
        topics: Topics,
        registry: ModelRegistry,
        arch: ModelArch,
        presence: Presence,
        session: RoleSession,
        signing_key: SigningKey | None,
        metrics: MetricsSink,
    ) -> None:
        self.state = RolloutState.load(Path(state_dir) / "rollout.json")
        self.journal = Path(state_dir) / "rollout.jsonl"
        self.topics = topics
        self.registry = registry
        self.arch = arch
        self.presence = presence
        self.session = session
        self.key = signing_key
        self.metrics = metrics

    # -- what the service calls ----------------------------------------------------------------
    def on_connected(self) -> None:
        """Re-publish the manifest and its models (idempotent; repairs a lost retained store)."""
        if self.state.manifest:
            self._publish(ReleaseManifest.from_bytes(self.state.manifest))
            self._check()

    def on_status(self, device: str, status: DeviceStatus) -> None:
        if device not in self.state.devices:
            self.state.devices.add(device)
            self.state.save()
        a, r = self.state.active, status.shadow
        if a is None or r is None or r.version != a.version or r.seq < a.first_seq:
            if a is not None:
                self._check()  # a device announced itself: the stage's cohort may have grown
            return
        if self.state.reports.get(device) == r:
            return
        self.state.reports[device] = r
        self.state.save()
        self._check()

    # -- operator commands (each returns one line for the operator) ----------------------------
    def start(
        self,
        version: int,
        *,
        stages: tuple[float, ...] = DEFAULT_STAGES,
        max_regression: float = 1.0,
        min_devices: int = 1,
    ) -> str:
        if self.state.active is not None:
            raise ConfigError(f"rollout of v{self.state.active.version} is running: abort it first")
        sha = self._sha(version)
        try:  # released models travel inline: one packet each
            checked_packet_size(self.topics.release_candidate, len(self._model(version)))
        except ProtocolError as e:
            raise ConfigError(f"v{version} cannot be released inline: {e}") from None
        prev, prev_sha = self.state.good if self.state.good else (None, "")
        if prev == version:
            raise ConfigError(f"v{version} is already what the fleet serves")
        now = time.time()
        self.state.active = Active(
            version, sha, prev, prev_sha, tuple(stages), max_regression, min_devices,
            first_seq=self.state.seq + 1, started=now, stage_started=now,
        )  # fmt: skip
        self.state.reports = {}
        self.state.outcome = "running"
        self._release(self._manifest(ReleaseMode.CANARY), "started", "operator")
        return f"rollout of v{version} started: stage 0 ({100 * stages[0]:g} %), previous {prev}"

    def promote(self) -> str:
        if self.state.active is None:
            raise ConfigError("no rollout is running")
        return self._advance("operator promote")

    def abort(self) -> str:
        a = self.state.active
        if a is None:
            raise ConfigError("no rollout is running")
        return self._back("aborted", "operator abort")

    def rollback(self, version: int | None = None) -> str:
        """Every device serves ``version`` (default: the previous version) at once."""
        if version is None:
            a = self.state.active
            m = ReleaseManifest.from_bytes(self.state.manifest) if self.state.manifest else None
            prev = a.previous if a is not None else (m.previous if m is not None else None)
            if prev is None:
                raise ConfigError("no previous version to roll back to: name one")
            version = prev
        if self.state.active is not None:
            self.state.active = None
            self.state.outcome = "aborted"
        self.state.good = (version, self._sha(version))
        self._direct(version, "rolled_back", "operator rollback")
        return f"every device serves v{version} (release seq {self.state.seq})"

    def run(self, command: str, args: dict[str, Any]) -> str:
        """One operator request (``aggregator.rollout_requests``)."""
        if command == "start":
            return self.start(
                int(args["version"]),
                stages=tuple(float(x) for x in args.get("stages") or DEFAULT_STAGES),
                max_regression=float(args.get("max_regression", 1.0)),
                min_devices=int(args.get("min_devices", 1)),
            )
        if command == "promote":
            return self.promote()
        if command == "abort":
            return self.abort()
        if command == "rollback":
            v = args.get("version")
            return self.rollback(None if v is None else int(v))
        raise ConfigError(f"unknown rollout command {command!r}")

    def status(self) -> dict[str, Any]:
        return status_of(self.state)

    # -- the stages ----------------------------------------------------------------------------
    def _check(self) -> None:
        a = self.state.active
        if a is None:
            return
        d = self._decision(a)
        if d.action == "advance":
            self._advance(d.reason, d)
        elif d.action == "rollback":
            self._back("rolled_back", d.reason, d)

    def _decision(self, a: Active) -> Decision:
        bound = cohort_bound(a.stages[a.stage])
        below = cohort_bound(a.stages[a.stage - 1]) if a.stage else -1
        fleet = self.topics.fleet
        fleet_devices = (self.state.devices | self.presence.known) - self.presence.revoked
        cohort = {d for d in fleet_devices if in_cohort(fleet, d, bound)}
        new = {d for d in cohort if not in_cohort(fleet, d, below)}
        return decide(
            self.state.reports, cohort, new,
            min_devices=a.min_devices, max_regression=a.max_regression,
        )  # fmt: skip

    def _advance(self, reason: str, d: Decision | None = None) -> str:
        a = self.state.active
        assert a is not None
        if a.stage + 1 >= len(a.stages):
            self.state.active = None
            self.state.outcome = "promoted"
            self.state.good = (a.version, a.sha256)
            self._record("promoted", a, reason, d)
            self.state.save()
            return f"v{a.version} promoted: every device serves it"
        a.stage += 1
        a.stage_started = time.time()
        self._release(self._manifest(ReleaseMode.CANARY), "advanced", reason, d)
        self._check()  # a stage whose new members already reported (or has none) goes on
        return f"v{a.version} at stage {a.stage} ({100 * a.stages[a.stage]:g} %)"

    def _back(self, outcome: str, reason: str, d: Decision | None = None) -> str:
        a = self.state.active
        assert a is not None
        self.state.active = None
        if a.previous is None:
            # Nothing was served before: devices that switched keep the candidate; say so.
            self.state.outcome = outcome
            self._record(outcome, a, reason + "; no previous version: manifest left", d)
            self.state.save()
            log.error("rollout of v%d halted (%s): no previous version", a.version, reason)
            return f"v{a.version} halted: no previous version to go back to"
        self.state.good = (a.previous, a.previous_sha256)
        self._record(outcome, a, reason, d)
        self._direct(a.previous, outcome, reason, record=False)
        return f"back to v{a.previous} ({reason})"

    def _direct(self, version: int, outcome: str, reason: str, *, record: bool = True) -> None:
        self.state.outcome = outcome
        m = ReleaseManifest(
            self.topics.fleet, self.state.seq + 1, version, self._sha(version), None, "",
            0, (1.0,), cohort_bound(1.0), ReleaseMode.DIRECT, 0.0, time.time(),
        )  # fmt: skip
        event = {"event": "released", "version": version, "reason": reason} if record else None
        self._commit(m, event)

    # -- manifests ------------------------------------------------------------------------------
    def _manifest(self, mode: ReleaseMode) -> ReleaseManifest:
        a = self.state.active
        assert a is not None
        return ReleaseManifest(
            self.topics.fleet, self.state.seq + 1, a.version, a.sha256, a.previous,
            a.previous_sha256, a.stage, a.stages, cohort_bound(a.stages[a.stage]), mode,
            a.max_regression, time.time(),
        )  # fmt: skip

    def _release(
        self, m: ReleaseManifest, event: str, reason: str, d: Decision | None = None
    ) -> None:
        a = self.state.active
        assert a is not None
        self.state.seq = m.seq  # the record names the manifest it made
        self._record(event, a, reason, d)
        self._commit(m, None)

    def _commit(self, m: ReleaseManifest, event: dict[str, Any] | None) -> None:
        if self.key is not None:
            m = replace(m, signature=self.key.sign(m.digest()))
        self.state.seq = m.seq
        self.state.manifest = m.to_bytes()
        if event is not None:
            self._journal({**event, "seq": m.seq})
        self.state.save()  # checkpoint before the publish: a restart re-publishes it
        self._publish(m)

    def _publish(self, m: ReleaseManifest) -> None:
        s, t = self.session, self.topics
        try:
            s.publish(t.release_candidate, self._model(m.version), retain=True)
            stable = self._model(m.previous) if m.previous is not None else b""
            s.publish(t.release_stable, stable, retain=True)
        except (ProtocolError, KeyError) as e:
            # A kept version pruned since (keep_versions) or grown past one packet: devices
            # cannot fetch it and the stage waits; `fedge rollout abort` or `rollback`.
            log.error("release seq %d: model not published: %s", m.seq, e)
        s.publish(t.release, m.to_bytes(), retain=True)

    def _model(self, version: int) -> bytes:
        # A pruned version releases its smaller serving model (ModelRegistry.release).
        onnx, sha, meta = self.registry.release(version)
        g = GlobalModel(
            version, self.arch, onnx, sha, float(meta.get("created", 0.0)),
            {k: float(v) for k, v in (meta.get("metrics") or {}).items()},
        )  # fmt: skip
        if self.key is not None:
            g = replace(g, signature=self.key.sign(g.digest()))
        return g.to_bytes()

    def _sha(self, version: int) -> str:
        try:
            return self.registry.release(version)[1]
        except KeyError as e:
            raise ConfigError(str(e).strip("'\"")) from None

    # -- the record -----------------------------------------------------------------------------
    def _record(self, event: str, a: Active, reason: str, d: Decision | None) -> None:
        rec: dict[str, Any] = {
            "event": event,
            "version": a.version,
            "previous": a.previous,
            "stage": a.stage,
            "fraction": a.stages[a.stage],
            "reason": reason,
        }
        if d is not None:
            rec |= {"reports": d.reports, "required": d.required, "regression_pp": d.regression_pp}
        log.info(
            "rollout v%d: %s at stage %d (%g %%): %s",
            a.version, event, a.stage, 100 * a.stages[a.stage], reason,
        )  # fmt: skip
        self._journal(rec)

    def _journal(self, rec: dict[str, Any]) -> None:
        rec = {"ts": time.time(), "seq": self.state.seq, **rec}
        self.state.log(rec)
        self.metrics.event(f"rollout_{rec['event']}")
        with self.journal.open("a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
