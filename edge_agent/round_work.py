"""The edge agent's round: deciding to train, training on the executor, the upload and its order.

A part of ``EdgeAgent`` (``edge_agent.agent_base``). Training runs on an executor so the MQTT
loop keeps serving keepalives; its result comes back to the loop thread through
``Mux.call_soon``. The crash-safety order: outbox, residual, publish.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

import numpy as np

from edge_agent.agent_base import AgentBase
from edge_agent.agent_base import agent_log as log
from edge_agent.round_plan import RoundPlan, plan_round
from edge_agent.states import AgentState, next_state
from edge_agent.store import HeldModel
from edge_agent.uplink import TrainOutcome, build_upload, calibration
from fedge.codecs import Codec, parse_codec
from fedge.envelopes import ModelArch, RoundTask
from fedge.errors import ProtocolError
from fedge.support.faults import crash_point

__all__ = ["RoundWork"]


class RoundWork(AgentBase):
    def _skip_round(self, t: RoundTask, why: str, level: int = logging.ERROR) -> None:
        """Give up on a round for good (persisted): retrying would fail the same way."""
        log.log(level, "%s: skipping round %d: %s", self.device_id, t.round, why)
        self.counters.rounds_skipped += 1
        self.last_round = t.round
        self.store.set_last_round(t.round)
        self.state = AgentState.IDLE

    # -- the state machine --------------------------------------------------------------------
    def _advance(self) -> None:
        """Decide what to do with the model and task we hold; called after every event."""
        if self.state in (AgentState.CONNECTING, AgentState.TRAINING, AgentState.UPLOADING):
            return
        t, m = self.task, self.model
        state = next_state(
            m, t, last_round=self.last_round, device_id=self.device_id, now=time.time()
        )
        if state != AgentState.TRAINING or t is None or m is None:
            self.state = state
            return
        try:
            codec = parse_codec(t.codec)
        except ValueError as e:
            self._skip_round(t, f"cannot honour codec: {e}")
            return
        problem = self.data.width_problem(m.arch.input_dim)
        if problem:
            self._skip_round(t, problem)
            return
        weights = self._global_weights(m)
        try:
            plan = plan_round(t, weights)
        except ValueError as e:
            self._skip_round(t, str(e))
            return
        self.state = AgentState.TRAINING
        seed = self.seed * 1_000_003 + t.round
        fut = self.executor.submit(self._train, m.arch, weights, t, seed, plan)
        fut.add_done_callback(lambda f: self.mux.call_soon(self._trained, t, m, weights, codec, f))

    def _train(
        self,
        arch: ModelArch,
        weights: Mapping[str, np.ndarray],
        t: RoundTask,
        seed: int,
        plan: RoundPlan,
    ) -> Any:
        train = self._train_fn
        if train is None:
            from edge_agent.trainer import train_local

            train = train_local
        # Keyword arguments only when used: a train function need not know them.
        kw: dict[str, Any] = {"qat": True} if t.hyper.qat else {}
        kw.update(plan.train_kwargs())
        return train(arch, weights, self.data.x, self.data.y, t.hyper, seed, **kw)

    def _trained(
        self,
        t: RoundTask,
        m: HeldModel,
        base: Mapping[str, np.ndarray],
        codec: Codec,
        fut: Future[TrainOutcome | None],
    ) -> None:
        try:
            result = fut.result()
        except Exception as e:
            log.exception("%s: local training failed in round %d", self.device_id, t.round)
            self._skip_round(t, f"training failed: {e}")
            self._advance()
            return
        if result is None:
            # A train function may decline the round (a simulated straggler that misses the
            # deadline): nothing is sent, and the round is over for this device.
            self._skip_round(t, "local training returned no result", logging.INFO)
            self._advance()
            return
        log.info(
            "%s: round %d: trained %d epochs on %d samples in %.2f s (loss %.4f)",
            self.device_id,
            t.round,
            getattr(result, "epochs", 0) or t.hyper.epochs,
            result.num_samples,
            result.seconds,
            result.loss,
        )
        if self.secagg.takes(t):
            # Secure round: the delta leaves only masked (edge_agent/secagg.py).
            self.secagg.submit(t, base, result.weights, result.num_samples, self.uplink.local_dp)
            self._uploaded(t, True)
            return
        calib = calibration(self.uplink, m.onnx, self.data.x, t)
        try:
            up = build_upload(self.uplink, base, result, t, codec, self.residual, calib=calib)
        except (ValueError, ProtocolError) as e:
            self._skip_round(t, f"cannot encode with {codec.name}: {e}")
            self._advance()
            return
        uid = up.update.update_id
        # Outbox first, then the residual: a crash in between resends the update and re-adds
        # a residual that was in fact sent (bounded, harmless); the reverse order would lose
        # both the update and the residual's mass.
        self.outbox.put(t.round, uid, up.payload)
        crash_point("after_outbox")
        self.residual = up.residual
        if up.save_residual:
            up.residual.save(self.store.dir)
        self.state = AgentState.UPLOADING
        # Said before the publish: a refusal or a failure to send is logged after it.
        log.info(
            "%s: round %d: sending update %s: %d bytes, codec %s",
            self.device_id,
            t.round,
            uid[:8],
            len(up.payload),
            codec.name,
        )
        self._send(t.round, uid, up.payload, on_done=lambda ok: self._uploaded(t, ok))

    def _send(
        self, round_id: int, uid: str, payload: bytes, on_done: Callable[[bool], None] | None
    ) -> None:
        def done(ok: bool, why: str) -> None:
            # The broker took it: it stays in the outbox until the aggregator's receipt. A
            # refusal is final (e.g. the ACL): resending would loop, so it leaves the outbox.
            if ok:
                self.store.record_acked(round_id, uid)
            else:
                log.warning(
                    "%s: broker refused update of round %d: %s", self.device_id, round_id, why
                )
                self.outbox.remove(round_id, uid)
            if on_done is not None:
                on_done(ok)

        try:
            size = self.session.publish(
                self.topics.update(self.device_id), payload, qos=1, on_done=done
            )
        except ProtocolError as e:
            log.error("%s: update of round %d not sent: %s", self.device_id, round_id, e)
            done(False, str(e))
            return
        self.counters.tx_bytes += size

    def _publish_secagg(self, topic: str, payload: bytes, retain: bool) -> None:
        try:
            self.counters.tx_bytes += self.session.publish(topic, payload, qos=1, retain=retain)
        except ProtocolError as e:
            log.error("%s: secure-round message not sent: %s", self.device_id, e)

    def _uploaded(self, t: RoundTask, ok: bool) -> None:
        if ok:
            self.counters.updates_sent += 1
        # Either way this round is over for us: retrying a refused update would loop.
        self.last_round = t.round
        self.store.set_last_round(t.round)
        self.state = AgentState.IDLE
        self._advance()
