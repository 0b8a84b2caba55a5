"""aggregator.sharded.partials (partial-sum envelopes) and the reducer's merge, no broker."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest

from aggregator.sharded.partials import (
    PARTIALS_SCHEMA_VERSION,
    PartialRequest,
    PartialSum,
    ShardPolicy,
    ShardTopics,
)
from aggregator.sharded.reducer import Merged, Reducer, merge_partials, overlaps
from fedge.errors import AggregationError, ProtocolError
from fedge.topics import Topics

SPEC = {"w": (3, 2), "b": (3,)}
TOPICS = ShardTopics(Topics("fleet1"))


def sums(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, 1, s).astype(np.float32) for k, s in SPEC.items()}


def partial(worker: str = "aggregator-0", **changes: Any) -> PartialSum:
    fields: dict[str, Any] = {
        "round": 4,
        "base_version": 2,
        "worker": worker,
        "request": 9,
        "total_weight": 30.0,
        "counted": {"dev-a": "ua", "dev-b": "ub"},
        "sums": sums(0),
        "uplink_bytes": 1234,
        "loss_sum": 12.5,
        "rejected": {"duplicate": 2},
    }
    fields.update(changes)
    return PartialSum(**fields)


def edited(payload: bytes, **changes: Any) -> bytes:
    obj = msgpack.unpackb(payload, raw=False)
    for k, v in changes.items():
        if v is _DELETE:
            del obj[k]
        else:
            obj[k] = v
    return msgpack.packb(obj, use_bin_type=True)


_DELETE = object()


# -- envelopes ------------------------------------------------------------------------------


def test_partial_sum_round_trips() -> None:
    # Prepare
    p = partial()

    # Execute
    back = PartialSum.from_bytes(p.to_bytes(), SPEC)

    # Assert
    assert (back.round, back.base_version, back.worker, back.request) == (4, 2, "aggregator-0", 9)
    assert (back.count, back.total_weight) == (2, 30.0)
    assert back.counted == {"dev-a": "ua", "dev-b": "ub"}
    assert (back.uplink_bytes, back.loss_sum, back.rejected) == (1234, 12.5, {"duplicate": 2})
    assert list(back.sums) == list(SPEC)
    for k, v in sums(0).items():
        assert back.sums[k].dtype == np.float32
        np.testing.assert_array_equal(back.sums[k], v)


def test_float64_sums_travel_as_fp32() -> None:
    # Prepare
    s64 = {k: v.astype(np.float64) + 1e-12 for k, v in sums(1).items()}

    # Execute
    back = PartialSum.from_bytes(partial(sums=s64).to_bytes(), SPEC)

    # Assert
    for k, v in s64.items():
        np.testing.assert_array_equal(back.sums[k], v.astype(np.float32))


def test_an_empty_partial_round_trips() -> None:
    # Prepare
    p = partial(counted={}, total_weight=0.0, sums={k: np.zeros(s) for k, s in SPEC.items()})

    # Execute
    back = PartialSum.from_bytes(p.to_bytes(), SPEC)

    # Assert
    assert (back.count, back.total_weight) == (0, 0.0)


def test_partial_request_round_trips() -> None:
    # Prepare
    req = PartialRequest(7, 123, ("aggregator-1",), ("dev-a", "dev-b"))

    # Execute
    back = PartialRequest.from_bytes(req.to_bytes())

    # Assert
    assert back == req
    assert back.asks("aggregator-1")
    assert not back.asks("aggregator-0")
    assert PartialRequest.from_bytes(PartialRequest(7, 1).to_bytes()).asks("aggregator-0")


_GOOD = partial().to_bytes()
_BAD_SHAPE = partial(sums={"w": np.zeros((2, 3), np.float32), "b": np.zeros(3)}).to_bytes()
_NAN = partial(sums={"w": np.full((3, 2), np.nan), "b": np.zeros(3)}).to_bytes()


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\x91\x01", "schema"),  # an array, not a map
        (b"\xc1", "bad_msgpack"),
        (edited(_GOOD, v=PARTIALS_SCHEMA_VERSION + 1), "version"),
        (edited(_GOOD, kind="partial_request"), "schema"),
        (edited(_GOOD, extra=1), "schema"),
        (edited(_GOOD, round=_DELETE), "schema"),
        (edited(_GOOD, count=3), "schema"),
        (edited(_GOOD, update_ids=["ua"]), "schema"),
        (edited(_GOOD, devices=["dev-a", "dev-a"]), "schema"),
        (edited(_GOOD, devices=["dev-a", "bad/device"]), "schema"),
        (edited(_GOOD, worker="+"), "schema"),
        (edited(_GOOD, total_weight=1.5), "schema"),  # below one sample per update
        (edited(_GOOD, total_weight=float("inf")), "schema"),
        (edited(_GOOD, rejected={"duplicate": 1.5}), "schema"),
        (edited(_GOOD, rejected={"duplicate": -1}), "schema"),
        (edited(_GOOD, tensors=b"\x90"), "bad_tensor"),  # no tensors
        (_BAD_SHAPE, "bad_tensor"),
        (_NAN, "non_finite"),
    ],
)
def test_partial_sum_rejects(payload: bytes, reason: str) -> None:
    # Execute
    with pytest.raises(ProtocolError) as info:
        PartialSum.from_bytes(payload, SPEC)

    # Assert
    assert info.value.reason == reason


def test_partial_with_weight_but_no_update_is_refused() -> None:
    # Prepare
    payload = partial(counted={}, total_weight=3.0).to_bytes()

    # Execute / Assert
    with pytest.raises(ProtocolError, match="total_weight"):
        PartialSum.from_bytes(payload, SPEC)


@pytest.mark.parametrize(
    "changes",
    [{"request": 0}, {"round": 0}, {"workers": ["a", "a"]}, {"drop": ["x y"]}, {"other": 1}],
)
def test_partial_request_rejects(changes: dict[str, Any]) -> None:
    # Prepare
    payload = edited(PartialRequest(3, 5).to_bytes(), **changes)

    # Execute / Assert
    with pytest.raises(ProtocolError):
        PartialRequest.from_bytes(payload)


def test_shard_topics() -> None:
    # Assert
    assert TOPICS.shared_updates("aggregators") == "$share/aggregators/fedge/fleet1/update/+"
    assert TOPICS.request == "fedge/fleet1/round/close"
    assert TOPICS.partial("aggregator-2") == "fedge/fleet1/partial/aggregator-2"
    assert TOPICS.all_partials == "fedge/fleet1/partial/+"
    assert TOPICS.worker_of("fedge/fleet1/partial/aggregator-2") == "aggregator-2"
    assert TOPICS.worker_of("fedge/fleet1/update/aggregator-2") is None
    with pytest.raises(ValueError, match="invalid"):
        TOPICS.partial("a/b")


# -- merge ----------------------------------------------------------------------------------


def test_merge_is_the_sum_of_sums_and_fedavg_the_weighted_mean() -> None:
    # Prepare
    a = partial("aggregator-0", sums=sums(1), total_weight=30.0, rejected={"duplicate": 1})
    b = partial(
        "aggregator-1",
        sums=sums(2),
        total_weight=50.0,
        counted={"dev-c": "uc"},
        rejected={"duplicate": 2, "bad_nonce": 1},
    )
    weights = sums(3)

    # Execute
    merged = merge_partials([a, b])
    new = merged.fedavg(weights, server_lr=0.5)

    # Assert
    assert merged.counted == {"dev-a": "ua", "dev-b": "ub", "dev-c": "uc"}
    assert merged.per_worker == {"aggregator-0": 2, "aggregator-1": 1}
    assert merged.total_weight == 80.0
    assert merged.rejected == {"duplicate": 3, "bad_nonce": 1}
    assert merged.uplink_bytes == 2468
    for k in SPEC:
        total = sums(1)[k].astype(np.float64) + sums(2)[k]
        np.testing.assert_allclose(merged.sums[k], total, rtol=1e-15)
        np.testing.assert_allclose(new[k], weights[k] + 0.5 * total / 80.0, rtol=1e-6)
        assert new[k].dtype == np.float32


@pytest.mark.parametrize(
    ("second", "match"),
    [
        (partial("aggregator-1", counted={"dev-b": "other"}, total_weight=5.0), "two workers"),
        (partial("aggregator-1", counted={"dev-c": "uc"}, round=5), "round"),
        (partial("aggregator-1", counted={"dev-c": "uc"}, base_version=3), "base"),
        (partial("aggregator-0", counted={"dev-c": "uc"}), "one worker"),
    ],
)
def test_merge_refuses_partials_that_do_not_belong_together(second: PartialSum, match: str) -> None:
    # Execute / Assert
    with pytest.raises(AggregationError, match=match):
        merge_partials([partial("aggregator-0"), second])


def test_merge_of_nothing_and_mean_of_no_update_are_refused() -> None:
    # Prepare
    empty = Merged(1, 0, {}, 0.0, {}, {})

    # Execute / Assert
    with pytest.raises(AggregationError):
        merge_partials([])
    with pytest.raises(AggregationError):
        empty.mean()


def test_overlaps_lists_workers_in_name_order() -> None:
    # Prepare
    ps = [
        partial("aggregator-2", counted={"d1": "u", "d2": "u"}),
        partial("aggregator-0", counted={"d1": "u"}),
        partial("aggregator-1", counted={"d2": "u", "d3": "u"}),
    ]

    # Execute / Assert
    assert overlaps(ps) == {
        "d1": ["aggregator-0", "aggregator-2"],
        "d2": ["aggregator-1", "aggregator-2"],
    }


# -- the reducer's bookkeeping (publish seam records instead of a broker) -------------------


def make_reducer() -> tuple[Reducer, list[PartialRequest], list[Merged]]:
    sent: list[PartialRequest] = []
    merged: list[Merged] = []

    def publish(topic: str, payload: bytes) -> None:
        assert topic == TOPICS.request
        sent.append(PartialRequest.from_bytes(payload))

    r = Reducer(TOPICS, ["aggregator-0", "aggregator-1"], publish)
    r.begin(4, 2, SPEC, merged.append)
    return r, sent, merged


def answer(r: Reducer, req: PartialRequest, worker: str, **changes: Any) -> bool:
    p = partial(worker, request=req.request, **changes)
    return r.handle(TOPICS.partial(worker), p.to_bytes())


def test_reducer_merges_once_every_worker_answered() -> None:
    # Prepare
    r, sent, merged = make_reducer()

    # Execute
    r.request()
    answer(r, sent[0], "aggregator-0")
    after_one = len(merged)
    answer(r, sent[0], "aggregator-1", counted={"dev-c": "uc"}, total_weight=7.0)

    # Assert
    assert sent[0].workers is None
    assert after_one == 0
    assert len(merged) == 1
    assert merged[0].counted == {"dev-a": "ua", "dev-b": "ub", "dev-c": "uc"}


def test_reducer_resolves_a_device_counted_twice() -> None:
    # Prepare
    r, sent, merged = make_reducer()
    r.request()

    # Execute: both count dev-b; aggregator-1 is asked again without it
    answer(r, sent[0], "aggregator-0")
    answer(r, sent[0], "aggregator-1", counted={"dev-b": "ub", "dev-c": "uc"})
    retry = sent[1]
    stale = answer(r, sent[0], "aggregator-1", counted={"dev-b": "ub", "dev-c": "uc"})
    answer(r, retry, "aggregator-1", counted={"dev-c": "uc"}, total_weight=9.0)

    # Assert
    assert (retry.workers, retry.drop) == (("aggregator-1",), ("dev-b",))
    assert stale  # consumed, but an answer to the old request changes nothing
    assert r.overlaps_resolved == 1
    assert len(merged) == 1
    assert merged[0].counted == {"dev-a": "ua", "dev-b": "ub", "dev-c": "uc"}
    assert merged[0].total_weight == 39.0


@pytest.mark.parametrize(
    ("topic_worker", "changes"),
    [
        ("aggregator-7", {}),  # not one of the reducer's workers
        ("aggregator-1", {"round": 3}),  # an earlier round
        ("aggregator-1", {"worker": "aggregator-0"}),  # signed by another worker
    ],
)
def test_reducer_ignores_partials_that_are_not_for_it(
    topic_worker: str, changes: dict[str, Any]
) -> None:
    # Prepare
    r, sent, merged = make_reducer()
    r.request()
    answer(r, sent[0], "aggregator-0")
    p = partial(**{"worker": topic_worker, "request": sent[0].request, **changes})

    # Execute
    consumed = r.handle(TOPICS.partial(topic_worker), p.to_bytes())

    # Assert
    assert consumed
    assert merged == []


def test_reducer_takes_deadline_partials_until_it_asks() -> None:
    # Prepare
    r, sent, merged = make_reducer()
    send: Callable[[str], bool] = lambda w: r.handle(  # noqa: E731
        TOPICS.partial(w), partial(w, request=0, counted={w: "u"}, total_weight=1.0).to_bytes()
    )

    # Execute
    send("aggregator-0")
    send("aggregator-1")

    # Assert
    assert sent == []
    assert merged[0].counted == {"aggregator-0": "u", "aggregator-1": "u"}
    assert not r.handle("fedge/fleet1/update/dev-a", b"")


def test_a_worker_slower_than_the_polling_still_counts() -> None:
    # Prepare: two polls; aggregator-1 answers each one poll late
    r, sent, merged = make_reducer()
    r.request()
    r.request()

    # Execute
    answer(r, sent[1], "aggregator-0")
    answer(r, sent[0], "aggregator-1", counted={"dev-c": "uc"}, total_weight=7.0)
    late_then = r.outstanding()
    answer(r, sent[1], "aggregator-1", counted={"dev-c": "uc", "dev-d": "ud"}, total_weight=9.0)

    # Assert: its older answer merged, and its newer one replaced it
    assert late_then == ["aggregator-1"]
    assert r.outstanding() == []
    assert [m.count for m in merged] == [3, 4]
    assert not any(m.final for m in merged)


def test_after_the_seal_only_answers_to_it_count_and_their_merge_is_final() -> None:
    # Prepare
    r, sent, merged = make_reducer()
    r.request()
    answer(r, sent[0], "aggregator-0")

    # Execute
    r.request(final=True)
    answer(r, sent[0], "aggregator-1", counted={"dev-c": "uc"}, total_weight=7.0)  # pre-seal
    before = len(merged)
    for w in ("aggregator-0", "aggregator-1"):
        answer(r, sent[1], w, counted={f"{w}-dev": "u"}, total_weight=3.0)

    # Assert
    assert sent[1].final
    assert r.sealing
    assert before == 0
    assert len(merged) == 1
    assert merged[0].final
    assert merged[0].counted == {"aggregator-0-dev": "u", "aggregator-1-dev": "u"}
    r.request()  # polling after the seal keeps asking for final partials
    assert sent[2].final


def test_partials_made_under_another_policy_are_refused_with_the_reason() -> None:
    # Prepare: this aggregator requires signed updates; the workers do not check them
    merged: list[Merged] = []
    strict = ShardPolicy(signed=True, clip_norm=0.0, max_num_samples=100_000)
    r = Reducer(TOPICS, ["aggregator-0"], lambda _t, _p: None, policy=strict)
    r.begin(4, 2, SPEC, merged.append)

    # Execute
    consumed = r.handle(TOPICS.partial("aggregator-0"), partial(request=0).to_bytes())
    matching = partial(request=0, policy=strict)
    r.handle(TOPICS.partial("aggregator-0"), matching.to_bytes())

    # Assert
    assert consumed
    assert len(merged) == 1  # only the partial made under the same policy
    assert r.refused == {}


def test_a_refused_partial_leaves_its_reason() -> None:
    strict = ShardPolicy(signed=True, clip_norm=1.0, max_num_samples=100_000)
    r = Reducer(TOPICS, ["aggregator-0"], lambda _t, _p: None, policy=strict)
    r.begin(4, 2, SPEC, lambda _m: None)
    r.handle(TOPICS.partial("aggregator-0"), partial(request=0).to_bytes())
    assert "signed=False" in r.refused["aggregator-0"]
    assert r.missing() == ["aggregator-0"]


def test_policy_and_final_travel_and_an_impossible_total_weight_is_refused() -> None:
    policy = ShardPolicy(signed=True, clip_norm=2.5, max_num_samples=10)
    p = PartialSum.from_bytes(partial(policy=policy, total_weight=20.0).to_bytes(), SPEC)
    assert p.policy == policy
    assert PartialRequest.from_bytes(PartialRequest(4, 1, final=True).to_bytes()).final
    with pytest.raises(ProtocolError, match="exceeds"):
        PartialSum.from_bytes(partial(policy=policy, total_weight=21.0).to_bytes(), SPEC)
