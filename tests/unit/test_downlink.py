"""The device's patch rules (edge_agent/downlink.py) and the aggregator's chain
(aggregator/downlink.py) without a broker; the msgpack + numpy example of docs/examples
against fedge's encoder."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.downlink import DownlinkChain
from edge_agent.downlink import Downlink
from fedge.envelopes import ModelPatch
from fedge.identity import SigningKey
from fedge.limits import DEFAULT_LIMITS
from fedge.patches import weights_sha256
from fedge.topics import Topics

ROOT = Path(__file__).resolve().parents[2]


class _Subs:
    """Records what the downlink asks the session (no broker: pure rules)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[str, ...]]] = []

    def subscribe(self, filters: Any) -> None:
        self.calls.append(("sub", tuple(filters)))

    def unsubscribe(self, filters: Any) -> None:
        self.calls.append(("unsub", tuple(filters)))


def _chain(n: int, retain: int, key: SigningKey) -> tuple[dict[str, np.ndarray], DownlinkChain]:
    rng = np.random.default_rng(0)
    w0 = {"a": rng.normal(size=(6, 4)).astype(np.float32), "b": np.zeros(6, np.float32)}
    chain = DownlinkChain("topk:0.3+int8+zstd", retain, seed=1)
    chain.reset(w0)
    target = dict(w0)
    for v in range(1, n + 1):
        target = {k: x + rng.normal(0, 0.1, x.shape).astype(np.float32) for k, x in target.items()}
        target = chain.advance(v, target, key)
    return w0, chain


def _downlink(key: SigningKey, following: bool = True) -> tuple[Downlink, _Subs]:
    d = Downlink("dev-0", Topics("t"), DEFAULT_LIMITS, key.verify_key, holding=following)
    d.full = not following  # as if its state directory said so (test below)
    subs = _Subs()
    d.session = subs  # type: ignore[assignment]
    return d, subs


def test_a_device_starts_on_patches_only_if_it_followed_them_when_it_stopped(
    tmp_path: Path,
) -> None:
    key = SigningKey.generate()

    def start(holding: bool) -> Downlink:
        d = Downlink("dev-0", Topics("t"), DEFAULT_LIMITS, key.verify_key, holding=holding,
                     state_dir=tmp_path)  # fmt: skip
        d.session = _Subs()  # type: ignore[assignment]
        return d

    assert start(True).full  # never followed patches (a fleet on full models)
    start(True).adopted_full(announces_patches=True)
    assert not start(True).full
    assert start(False).full  # holds no model: needs the full one whatever it did before
    start(True).resync("test")
    assert start(True).full


def test_patches_in_any_order_reach_the_aggregators_view() -> None:
    key = SigningKey.generate()
    w0, chain = _chain(4, retain=8, key=key)
    d, subs = _downlink(key)
    payloads = [p for _, p in chain.patches]
    got = None
    for p in reversed(payloads):  # a retained burst in the worst order
        got = d.offer(p, (0, w0)) or got
    assert got is not None
    assert got.version == 4
    assert weights_sha256(got.weights) == weights_sha256(chain.view)
    assert d.resyncs == 0
    assert subs.calls == []  # it already followed patches only


def test_gap_past_the_retained_window_resyncs_with_the_full_model() -> None:
    key = SigningKey.generate()
    w0, chain = _chain(5, retain=2, key=key)
    assert [v for v, _ in chain.patches] == [4, 5]
    assert ModelPatch.from_bytes(chain.patches[-1][1]).retained_from == 3
    d, subs = _downlink(key)
    assert d.offer(chain.patches[-1][1], (0, w0)) is None
    assert d.resyncs == 1
    assert d.full
    assert subs.calls == [("sub", (d.topics.model, d.topics.all_model_chunks))]


def test_a_task_that_patches_cannot_reach_resyncs_once() -> None:
    key = SigningKey.generate()
    d, subs = _downlink(key)
    d.on_task_base(3, 3)
    assert d.resyncs == 0
    d.on_task_base(4, 3)
    d.on_task_base(4, 3)
    assert d.resyncs == 1
    assert len(subs.calls) == 1


def test_a_full_model_is_left_for_patches_once_the_fleet_is_known_to_send_them() -> None:
    key = SigningKey.generate()
    d, subs = _downlink(key, following=False)
    assert d.full
    d.adopted_full(announces_patches=False)
    assert d.full  # no patch seen, none announced: this fleet sends full models
    d.adopted_full(announces_patches=True)
    assert not d.full
    assert subs.calls == [("unsub", (d.topics.model, d.topics.all_model_chunks))]


def test_checkpointed_chain_restores_and_retains_at_most_k() -> None:
    key = SigningKey.generate()
    w0, chain = _chain(6, retain=3, key=key)
    other = DownlinkChain("topk:0.3+int8+zstd", 3)
    other.restore(chain.view, chain.patches, w0)
    assert weights_sha256(other.view) == weights_sha256(chain.view)
    assert [v for v, _ in other.patches] == [4, 5, 6]


def test_the_msgpack_numpy_example_applies_fedge_patches_bit_exactly() -> None:
    sys.path.insert(0, str(ROOT / "docs" / "examples"))
    try:
        from apply_patch import apply, decode_patch, signed_digest
    finally:
        sys.path.pop(0)
    key = SigningKey.generate()
    w0, chain = _chain(3, retain=8, key=key)
    weights = w0
    for _, payload in chain.patches:
        msg = decode_patch(payload)
        assert key.verify_key.verify(signed_digest(msg), msg["signature"])
        weights = apply(weights, msg)
    assert all(weights[k].tobytes() == chain.view[k].tobytes() for k in w0)


class _Retained:
    """A broker's retained store, and every publish (the session side of ``publish``)."""

    def __init__(self) -> None:
        self.store: dict[str, bytes] = {}
        self.sent: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int:
        assert retain
        self.sent.append((topic, payload))
        if payload:
            self.store[topic] = payload
        else:
            self.store.pop(topic, None)
        return len(payload)


def _retained_versions(broker: _Retained) -> list[int]:
    return sorted(ModelPatch.from_bytes(p).to_version for p in broker.store.values())


def test_patches_take_slots_so_nothing_is_cleared_and_a_smaller_window_clears_the_rest() -> None:
    # Arrange
    key, topics, broker = SigningKey.generate(), Topics("t"), _Retained()
    rng = np.random.default_rng(0)
    w0 = {"a": rng.normal(size=(6, 4)).astype(np.float32)}
    chain = DownlinkChain("topk:0.3+int8+zstd", 3, seed=1)
    chain.reset(w0)
    target = dict(w0)

    # Act: seven versions, each published as it is made
    for v in range(1, 8):
        target = {k: x + np.float32(0.1) for k, x in target.items()}
        target = chain.advance(v, target, key)
        chain.publish(broker, topics)  # type: ignore[arg-type]

    # Assert: the last three stay retained, in three topics, and no empty payload was sent
    assert _retained_versions(broker) == [5, 6, 7]
    assert len(broker.store) == 3
    assert all(p for _, p in broker.sent)
    assert broker.sent[-1][0] == topics.model_patch(7 % 3)

    # Act: a restart with a window of two republishes it and clears the slot it no longer uses
    smaller = DownlinkChain("topk:0.3+int8+zstd", 2, seed=1)
    smaller.restore(chain.view, chain.patches, target)
    smaller.publish(broker, topics, every=True)  # type: ignore[arg-type]

    # Assert
    assert _retained_versions(broker) == [6, 7]
    assert set(broker.store) == {topics.model_patch(0), topics.model_patch(1)}
