"""The edge agent's incoming messages: which part each topic goes to, and a new task.

A part of ``EdgeAgent`` (``edge_agent.agent_base``): every message is hostile until checked,
and a refused one is counted by kind and logged once.
"""

from __future__ import annotations

from edge_agent.agent_base import AgentBase
from edge_agent.agent_base import agent_log as log
from fedge.envelopes import Receipt, RoundTask
from fedge.errors import ProtocolError
from fedge.task_check import check_task
from fedge.transport.mqtt import publish_packet_size

__all__ = ["MessageRouting"]


class MessageRouting(AgentBase):
    # -- incoming -----------------------------------------------------------------------------
    def _on_message(self, topic: str, payload: bytes) -> None:
        qos = 1 if topic == self.topics.receipt(self.device_id) else 0  # latest-only: QoS 0
        size = publish_packet_size(topic, len(payload), qos)
        self.counters.rx_bytes += size
        try:
            if self.secagg.handle(topic, payload):
                return
            if self.downlink.wants(topic):
                self.counters.rx_patch_bytes += size
                self._on_patch(payload)
            elif self.models.wants(topic):
                self.counters.rx_model_bytes += size
                full = self.models.offer(topic, payload)
                if full is not None:
                    self._on_model(full)
            elif topic == self.topics.task and not payload:
                # The aggregator closed the round (protocol §9.5): the next task follows.
                self.task = None
            elif topic == self.topics.task:
                self.counters.rx_task_bytes += size
                task = RoundTask.from_bytes(payload, self.limits)
                self._on_task(check_task(task, self._aggregator_key, self.limits))
            elif self.release.wants(topic):
                self.release.offer(topic, payload)
            elif topic == self.topics.receipt(self.device_id):
                r = Receipt.from_bytes(payload, self.limits, device=self.device_id)
                self.outbox.remove(r.round, r.update_id)
                log.info(
                    "%s: receipt: update %s of round %d %s",
                    self.device_id,
                    r.update_id[:8],
                    r.round,
                    "came too late (its site was cut off): in no version" if r.late else "counted",
                )
        except ProtocolError as e:
            if topic == self.topics.task:
                self.counters.tasks_rejected += 1
            elif self.release.wants(topic):
                self.counters.releases_rejected += 1
            elif self.downlink.wants(topic):
                self.counters.patches_rejected += 1
            else:
                self.counters.models_rejected += 1
            log.warning("%s: ignored message on %s: %s", self.device_id, topic, e)

    def _on_task(self, t: RoundTask) -> None:
        if self.task is not None and t.round < self.task.round:
            return  # a stale retained/redelivered task; the newer one stands
        self.task = t
        self.secagg.on_task(t)
        self.downlink.on_task_base(t.base_version, self.model.version if self.model else None)
        self.outbox.drop_before(t.oldest_accepted)  # those rounds closed: no receipt will come
        self._advance()
