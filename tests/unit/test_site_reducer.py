"""The reducer's side of site gateways, no broker: summaries before the seal (counts, no
tensors), and going on without a gateway cut off from the centre (before and after the seal),
telling it so by naming the others in the final request."""

from __future__ import annotations

from typing import Any

import numpy as np

from aggregator.sharded.partials import PartialSum
from tests.unit.test_partials import SPEC, answer, make_reducer, partial

A, B = "aggregator-0", "aggregator-1"  # the names make_reducer's reducer knows


def summary(worker: str, **changes: Any) -> PartialSum:
    return partial(worker, sums={}, **changes)


def test_a_summary_travels_without_tensors_and_is_small() -> None:
    dense, summ = partial(A), summary(A)
    back = PartialSum.from_bytes(summ.to_bytes(), SPEC)
    assert not back.dense
    assert back.sums == {}
    assert back.counted == summ.counted
    assert back.total_weight == summ.total_weight
    assert PartialSum.from_bytes(dense.to_bytes(), SPEC).dense
    assert len(summ.to_bytes()) < len(dense.to_bytes())


def test_summaries_merge_to_counts_and_the_seal_waits_for_dense_partials() -> None:
    r, sent, merged = make_reducer()
    r.request()
    answer(r, sent[0], A, sums={})
    answer(r, sent[0], B, sums={}, counted={"dev-c": "uc"}, total_weight=7.0)
    assert len(merged) == 1
    assert not merged[0].dense
    assert merged[0].count == 3

    r.request(final=True)
    answer(r, sent[1], A, sums={})  # a summary cannot close a round
    answer(r, sent[1], B, sums={}, counted={"dev-c": "uc"}, total_weight=7.0)
    assert len(merged) == 1
    answer(r, sent[1], A)
    answer(r, sent[1], B, counted={"dev-c": "uc"}, total_weight=7.0)
    assert len(merged) == 2
    assert merged[1].final
    assert merged[1].dense
    want = {k: np.float64(1) * partial(A).sums[k] * 2 for k in SPEC}
    for k in SPEC:
        np.testing.assert_allclose(merged[1].sums[k], want[k], rtol=1e-6)


def test_a_gateway_left_out_before_the_seal_is_named_out_of_the_final_request() -> None:
    r, sent, merged = make_reducer()
    r.request()
    answer(r, sent[0], A, sums={})
    r.leave_out([B])  # cut off: the merge goes on with A alone
    assert len(merged) == 1
    assert merged[0].left_out == (B,)
    assert merged[0].count == 2

    r.request(final=True)
    assert sent[1].final
    assert sent[1].workers == (A,)
    answer(r, sent[1], B)  # too late once sealed without it
    answer(r, sent[1], A)
    assert merged[-1].final
    assert set(merged[-1].counted) == {"dev-a", "dev-b"}


def test_a_gateway_back_before_the_seal_counts_again() -> None:
    r, sent, merged = make_reducer()
    r.request()
    r.leave_out([B])
    answer(r, sent[0], B, sums={}, counted={"dev-c": "uc"}, total_weight=7.0)
    answer(r, sent[0], A, sums={})
    assert r.expected == (A, B)
    assert merged[-1].count == 3
    assert merged[-1].left_out == ()


def test_a_gateway_silent_after_the_seal_is_sealed_out_by_a_second_final_request() -> None:
    r, sent, merged = make_reducer()
    r.request(final=True)
    answer(r, sent[0], A)
    r.leave_out([B])
    assert sent[1].final
    assert sent[1].workers == (A,)
    assert sent[1].request > sent[0].request
    answer(r, sent[0], B)  # its answer to the first seal comes after: ignored
    assert not merged
    answer(r, sent[1], A)
    assert len(merged) == 1
    assert merged[0].final
    assert merged[0].left_out == (B,)


def test_the_last_gateway_is_never_left_out() -> None:
    r, _sent, _ = make_reducer()
    r.leave_out([A, B])
    assert r.expected == (A, B)


def test_a_late_receipt_says_so_and_an_ordinary_one_is_unchanged_on_the_wire() -> None:
    import msgpack

    from fedge.envelopes import Receipt

    late = Receipt("dev-a1", 3, "u1", late=True)
    plain = Receipt("dev-a1", 3, "u1")
    assert Receipt.from_bytes(late.to_bytes()).late
    assert not Receipt.from_bytes(plain.to_bytes()).late
    # An ordinary receipt carries no "late" key: devices built before it read it as before.
    assert "late" not in msgpack.unpackb(plain.to_bytes(), raw=False)
