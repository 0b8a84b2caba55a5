"""The device's side of a release (protocol §5.8): follow the signed manifest on
``{p}/release`` and the released models on ``{p}/release/candidate`` and
``{p}/release/stable``, decide what to serve, shadow-evaluate a candidate before serving it.

``ReleaseFollower`` holds no session: the agent hands it every message on those topics
(``wants``/``offer``) and republishes its status when ``on_change`` is called. Its decisions,
for the newest accepted manifest ``m`` (``fedge.release_check``: signed, this fleet, ``seq``
above the held one):

- the version to serve is ``m.serves(device)``: the candidate inside the stage's cohort, the
  last known good (``m.previous``) outside it, nothing if that is None;
- its bytes come from disk (serving or last known good) or from a released model of that
  version whose signature and sha256 match the manifest; until then the device waits;
- in ``canary`` mode, before serving the candidate the device scores it and what it serves on
  its labelled hold-out (``edge_agent.shadow``) and reports both in its status; it switches
  if the candidate loads and runs. Whether the accuracy is good enough is the controller's
  call, pooled over the stage's devices (one device's hold-out is too small to judge
  alone): a regression rolls the stage back and the canaries return to their last known
  good. Each candidate (version, sha256) is evaluated once; a load failure stands;
- going back to the previous version, and ``direct`` mode (rollback, abort), switch at once.

Training is untouched: the agent keeps training on ``{p}/model/global``, forward only, while
an older serving version can be released again by a newer manifest (a rollback).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edge_agent.serving_store import ServingStore
from fedge.envelopes import GlobalModel, ReleaseManifest, ReleaseMode, ShadowReport
from fedge.errors import ProtocolError
from fedge.identity import VerifyKey
from fedge.limits import Limits
from fedge.release_check import check_release
from fedge.topics import Topics

__all__ = ["ReleaseFollower"]

log = logging.getLogger(__name__)


class ReleaseFollower:
    def __init__(
        self,
        device_id: str,
        topics: Topics,
        state_dir: Path,
        holdout: tuple[np.ndarray, np.ndarray],
        *,
        verify_key: VerifyKey | None,
        limits: Limits,
        on_change: Callable[[], None],
    ) -> None:
        self.device_id = device_id
        self.topics = topics
        self.store = ServingStore(state_dir)
        self.holdout = holdout
        self.verify_key = verify_key
        self.limits = limits
        self.on_change = on_change
        self._models: dict[int, GlobalModel] = {}  # released models seen, verified
        self.rejected = 0

    @property
    def serving(self) -> int | None:
        return self.store.serving.version if self.store.serving else None

    @property
    def report(self) -> ShadowReport | None:
        return self.store.report

    def wants(self, topic: str) -> bool:
        t = self.topics
        return topic in (t.release, t.release_candidate, t.release_stable)

    def offer(self, topic: str, payload: bytes) -> None:
        """Take one message; ``ProtocolError`` for a refused one (the caller logs it)."""
        if not payload:
            return  # a retained topic being cleared
        try:
            if topic == self.topics.release:
                self._on_manifest(ReleaseManifest.from_bytes(payload, self.limits))
            else:
                self._on_model(GlobalModel.from_bytes(payload, self.limits))
        except ProtocolError:
            self.rejected += 1
            raise

    def _on_manifest(self, m: ReleaseManifest) -> None:
        fresh = check_release(m, self.verify_key, self.topics.fleet, self.store.manifest)
        if fresh is None:
            self._step()  # the held manifest again (a restart): finish what it asked
            return
        self.store.set_manifest(fresh)
        log.info(
            "%s: release seq %d: v%d at stage %d (%.0f %%, %s), previous %s; serve %s",
            self.device_id,
            fresh.seq,
            fresh.version,
            fresh.stage,
            100 * fresh.fraction,
            fresh.mode,
            fresh.previous,
            fresh.serves(self.device_id),
        )
        self._step()

    def _on_model(self, g: GlobalModel) -> None:
        if g.is_manifest:
            raise ProtocolError("too_large", f"released v{g.version} is chunked: not supported")
        if self.verify_key is not None and not (
            g.signature and self.verify_key.verify(g.digest(), g.signature)
        ):
            self._failed(g.version, g.sha256, "bad_signature")
            raise ProtocolError("bad_signature", f"released v{g.version}: bad signature")
        self._models = {v: x for v, x in self._models.items() if v != g.version}
        self._models[g.version] = g
        while len(self._models) > 2:
            del self._models[min(self._models)]
        self._step()

    def _bytes(self, version: int, sha256: str) -> bytes | None:
        onnx = self.store.bytes_of(version, sha256)
        if onnx is not None:
            return onnx
        g = self._models.get(version)
        if g is None:
            return None
        if g.sha256 != sha256:
            self._failed(version, sha256, "sha256 differs from the manifest")
            return None
        return g.onnx

    def _step(self) -> None:
        m = self.store.manifest
        if m is None:
            return
        target = m.serves(self.device_id)
        if target is None or target == self.serving:
            return
        sha = m.sha256 if target == m.version else m.previous_sha256
        onnx = self._bytes(target, sha)
        if onnx is None:
            return  # its model has not arrived yet
        candidate = target == m.version and target != m.previous
        if m.mode == ReleaseMode.CANARY and candidate and not self._evaluate(m, onnx):
            return
        back = not candidate or m.mode == ReleaseMode.DIRECT
        self.store.switch(target, sha, onnx, m.seq, back=back)
        log.info("%s: serving v%d (release seq %d)", self.device_id, target, m.seq)
        r = self.store.report
        if r is not None and r.version == target and not r.switched:
            self.store.set_report(_switched(r))
        self.on_change()

    def _evaluate(self, m: ReleaseManifest, onnx: bytes) -> bool:
        """Shadow-evaluate ``m``'s candidate once; whether to switch to it."""
        r = self.store.report
        if r is None or r.version != m.version or r.seq < self._first_seq(m):
            r = self._score(m, onnx)
            self.store.set_report(r)
            self.on_change()
        return not r.error

    def _first_seq(self, m: ReleaseManifest) -> int:
        """Reports of this candidate from an earlier rollout of the same version are stale:
        stage 0 of a rollout is where evaluation starts again."""
        return m.seq - m.stage if m.mode == ReleaseMode.CANARY else m.seq

    def _score(self, m: ReleaseManifest, onnx: bytes) -> ShadowReport:
        from edge_agent.shadow import score

        x, y = self.holdout
        try:
            cand = score(onnx, x, y)
        except ValueError as e:
            log.warning("%s: candidate v%d does not load: %s", self.device_id, m.version, e)
            return ShadowReport(m.seq, m.version, 0, 0.0, 0.0, 0.0, error=f"load: {e}")
        serving = self.store.serving
        base = self.store.model(serving)
        report = ShadowReport(
            m.seq, m.version, cand.samples, cand.accuracy, cand.loss, cand.latency_ms
        )
        if serving is not None and base is not None:
            try:
                b = score(base, x, y)
            except ValueError as e:
                log.warning("%s: serving v%d does not load: %s", self.device_id, serving.version, e)
            else:
                report = ShadowReport(
                    m.seq, m.version, cand.samples, cand.accuracy, cand.loss, cand.latency_ms,
                    serving.version, b.accuracy, b.loss, b.latency_ms,
                )  # fmt: skip
        # Nothing served yet (a fleet's first release): no baseline to compare with, which
        # read "(serving None: 0.0000)".
        baseline = (
            "nothing served yet"
            if report.baseline is None
            else f"serving v{report.baseline}: {report.base_accuracy:.4f}"
        )
        log.info(
            "%s: shadow evaluation of v%d on %d samples: accuracy %.4f (%s), "
            "%.3f ms/sample; %.2f points lost",
            self.device_id,
            m.version,
            report.samples,
            report.accuracy,
            baseline,
            report.latency_ms,
            report.regression_pp,
        )
        return report

    def _failed(self, version: int, sha256: str, why: str) -> None:
        """A released model of the manifest's candidate that cannot be verified: reported."""
        m = self.store.manifest
        if m is None or version != m.version or m.serves(self.device_id) != version:
            return
        r = self.store.report
        if r is not None and r.version == version and r.error and r.seq >= self._first_seq(m):
            return
        log.warning("%s: candidate v%d refused: %s", self.device_id, version, why)
        self.store.set_report(ShadowReport(m.seq, version, 0, 0.0, 0.0, 0.0, error=why))
        self.on_change()


def _switched(r: ShadowReport) -> ShadowReport:
    from dataclasses import replace

    return replace(r, switched=True)
