"""Turning weights into a published version: ONNX render, central evaluation, signature,
registry, and the retained announcement (inline, or chunked when larger than one packet
should carry), plus the int8 QDQ twin calibrated from devices' activation ranges."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, replace
from typing import Any

import numpy as np

from aggregator.evaluation import EvalSet, evaluate_onnx
from aggregator.registry import ModelRegistry
from fedge.chunks import split_model
from fedge.envelopes import GlobalModel, ModelArch, RoundTask
from fedge.errors import ProtocolError
from fedge.identity import SigningKey
from fedge.topics import Topics
from fedge.transport.base import RoleSession

__all__ = ["ModelPublisher"]

log = logging.getLogger(__name__)


class ModelPublisher:
    def __init__(
        self,
        arch: ModelArch,
        topics: Topics,
        registry: ModelRegistry,
        *,
        eval_set: EvalSet | None,
        signing_key: SigningKey | None,
        chunk_bytes: int,
    ) -> None:
        self.arch = arch
        self.topics = topics
        self.registry = registry
        self.eval_set = eval_set
        self.signing_key = signing_key
        self.chunk_bytes = chunk_bytes
        self._template: Any = None
        self.onnx: bytes = b""
        self.current: GlobalModel | None = None
        self.message: bytes = b""
        self.int8_message: bytes = b""
        self.model_bytes = 0
        self._chunks_published = 0
        # Facts devices read off every announcement besides the evaluation: ``patch_retain``
        # when versions also go out as patches (protocol §5.4, §9.8).
        self.announce: dict[str, float] = {}

    def _announce(self, version: int, onnx: bytes, metrics: dict[str, float]) -> GlobalModel:
        sha = hashlib.sha256(onnx).hexdigest()
        msg = GlobalModel(version, self.arch, onnx, sha, time.time(), {**metrics, **self.announce})
        if self.signing_key is not None:
            msg = replace(msg, signature=self.signing_key.sign(msg.digest()))
        return msg

    def sign_task(self, task: RoundTask) -> RoundTask:
        """``task`` signed over every field with the model key (unchanged without one)."""
        if self.signing_key is None:
            return task
        return replace(task, signature=self.signing_key.sign(task.digest()))

    def render(
        self,
        version: int,
        weights: Mapping[str, np.ndarray],
        provenance: Mapping[str, Any] | None = None,
    ) -> dict[str, float]:
        """Export, evaluate and register ``version``; returns its central metrics.

        ``provenance`` (the round and devices behind the version) goes into its registry
        metadata beside sha256, size and central metrics (``aggregator.registry``)."""
        if self._template is None:
            from models.onnx_export import OnnxTemplate

            a = self.arch
            self._template = OnnxTemplate(a.name, a.input_dim, a.num_classes)
        onnx = self._template.render(weights)
        metrics = evaluate_onnx(onnx, self.eval_set) if self.eval_set is not None else {}
        msg = self._announce(version, onnx, metrics)
        self.current, self.onnx, self.message = msg, onnx, msg.to_bytes()
        if not self.registry.path(version).exists():
            meta = {
                "version": version,
                "sha256": msg.sha256,
                "arch": asdict(self.arch),
                "metrics": metrics,
                "created": msg.created,
                "bytes": len(onnx),
                **dict(provenance or {}),
            }
            self.registry.save(version, onnx, meta)
        return metrics

    def render_int8(
        self, version: int, ranges: Mapping[str, tuple[float, float]] | None
    ) -> dict[str, Any]:
        """The int8 twin of the rendered version, or the reason there is none."""
        from aggregator.calibration import build_int8

        build = build_int8(self.onnx, ranges)
        if build.onnx is None:
            self.int8_message = b""
            return {"int8_skipped": 1.0}
        metrics: dict[str, float] = {"int8_bytes": float(len(build.onnx))}
        if self.eval_set is not None:
            ev = evaluate_onnx(build.onnx, self.eval_set)
            metrics.update({"int8_accuracy": ev["accuracy"], "int8_loss": ev["loss"]})
        self.int8_message = self._announce(version, build.onnx, metrics).to_bytes()
        path = self.registry.path(version).with_suffix(".int8.onnx")
        if not path.exists():
            from fedge.support.fsutil import atomic_write

            atomic_write(path, build.onnx)
        return metrics

    def publish(self, session: RoleSession) -> None:
        try:
            if len(self.message) <= self.chunk_bytes:
                self.model_bytes = session.publish(self.topics.model, self.message, retain=True)
            else:
                self.model_bytes = self._publish_chunked(session)
            if self.int8_message:
                session.publish(self.topics.model_int8, self.int8_message, retain=True)
        except ProtocolError as e:
            # The version is checkpointed and in the registry; devices cannot get it this way.
            log.error("model not published: %s", e)

    def _publish_chunked(self, session: RoleSession) -> int:
        """Chunks first, then the manifest; stale chunk topics of a longer model are cleared."""
        full = self.current
        assert full is not None
        chunks = split_model(full.version, full.onnx, full.sha256, self.chunk_bytes)
        size = 0
        for c in chunks:
            size += session.publish(self.topics.model_chunk(c.index), c.to_bytes(), retain=True)
        for i in range(len(chunks), self._chunks_published):
            session.publish(self.topics.model_chunk(i), b"", retain=True)
        self._chunks_published = len(chunks)
        manifest = replace(full, onnx=b"", chunks=len(chunks), size=len(full.onnx))
        return size + session.publish(self.topics.model, manifest.to_bytes(), retain=True)
