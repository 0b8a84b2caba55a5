"""Secure aggregation, pure protocol: exact sums with dropouts at every stage, the failure
below the threshold, masked vectors that look uniform, packing and sharing round trips."""

from __future__ import annotations

import os

import numpy as np
import pytest

from fedge.errors import ProtocolError
from fedge.identity import SigningKey
from fedge.limits import DEFAULT_LIMITS
from fedge.secagg import shamir
from fedge.secagg.client import SecAggClient
from fedge.secagg.graph import neighbours
from fedge.secagg.messages import (
    Advertise,
    Inbox,
    MaskedInput,
    Open,
    Roster,
    ShareBundle,
    Signed,
    Unmask,
    UnmaskReply,
    read_body,
)
from fedge.secagg.ring import RingSpec, pack_bits, unpack_bits
from fedge.secagg.server import SecAggServer

L = DEFAULT_LIMITS
PARAMS = 257


def _wire(signed: Signed, cls):  # type: ignore[no-untyped-def]
    """Through the bytes, as the aggregator would read it."""
    return read_body(Signed.from_bytes(signed.to_bytes(), L), cls, L)


def run_round(
    n: int,
    *,
    drop_after_advert: int = 0,
    drop_after_shares: int = 0,
    drop_after_upload: int = 0,
    degree: int = 100,
    threshold: float = 0.5,
    seed: int = 0,
) -> tuple[np.ndarray | None, np.ndarray, SecAggServer]:
    """One round; returns (recovered ring sum or None, plain sum of survivors' inputs, server)."""
    rng = np.random.default_rng(seed)
    ring = RingSpec.for_devices(8, n, clip=1.0, weight_cap=100)
    opened = Open(1, os.urandom(16), ring)
    devices = [f"dev{i:03d}" for i in range(n)]
    keys = {d: SigningKey.generate() for d in devices}
    clients = {d: SecAggClient(d, opened, keys[d]) for d in devices}
    inputs = {
        d: ring.encode(rng.normal(0, 0.5, PARAMS - 1), int(rng.integers(1, 150)), rng)
        for d in devices
    }
    server = SecAggServer(opened, degree, threshold, PARAMS)
    order = list(rng.permutation(devices))
    gone_a = set(order[:drop_after_advert])
    gone_s = set(order[drop_after_advert : drop_after_advert + drop_after_shares])
    k = drop_after_advert + drop_after_shares
    gone_u = set(order[k : k + drop_after_upload])
    for d in devices:
        s = clients[d].advertise()
        assert s.verified_by(keys[d].verify_key)
        server.add_advert(_wire(s, Advertise), s)
    roster = _wire(Signed.make(server.roster(), None), Roster)
    for d in devices:
        if d not in gone_a:
            server.add_shares(_wire(clients[d].share(roster), ShareBundle))
    for d, box in server.inboxes().items():
        if d in gone_s:
            continue
        clients[d].receive(_wire(Signed.make(box, None), Inbox))
        server.add_masked(_wire(clients[d].masked(inputs[d]), MaskedInput))
    req = _wire(Signed.make(server.unmask_request(), None), Unmask)
    for d in req.survivors:
        if d not in gone_u:
            server.add_reply(_wire(clients[d].unmask(req), UnmaskReply))
    plain = np.zeros(PARAMS, np.uint64)
    for d in req.survivors:
        ring.add(plain, inputs[d])
    return (server.finish() if server.ready() else None), plain, server


def test_no_dropout_sum_equals_plain_quantized_sum() -> None:
    got, plain, server = run_round(8)
    assert got is not None
    np.testing.assert_array_equal(got, plain)
    assert len(server.masked) == 8


@pytest.mark.parametrize(
    ("after_advert", "after_shares", "after_upload"), [(2, 0, 0), (0, 2, 0), (0, 0, 2), (1, 2, 1)]
)
def test_dropouts_at_every_stage_keep_the_sum_exact(
    after_advert: int, after_shares: int, after_upload: int
) -> None:
    got, plain, server = run_round(
        10,
        drop_after_advert=after_advert,
        drop_after_shares=after_shares,
        drop_after_upload=after_upload,
    )
    assert got is not None
    np.testing.assert_array_equal(got, plain)
    assert len(server.masked) == 10 - after_advert - after_shares
    assert server.request is not None
    assert len(server.request.dropped) == after_shares


def test_sparse_graph_with_dropouts() -> None:
    # 40 devices, degree 8: each device shares with 8 neighbours only.
    got, plain, server = run_round(40, drop_after_shares=4, drop_after_upload=2, degree=8, seed=3)
    assert all(len(v) == 8 for v in server.graph.values())
    assert got is not None
    np.testing.assert_array_equal(got, plain)


def test_fewer_than_threshold_survivors_cannot_unmask() -> None:
    # Complete graph of 6, threshold 4 of 5 neighbours; 3 vanish after uploading.
    got, _, server = run_round(6, drop_after_upload=3, threshold=0.7)
    assert got is None
    assert server.missing()
    with pytest.raises(ProtocolError, match="too few shares"):
        server.finish()


def test_decoded_sum_is_the_weighted_sum() -> None:
    ring = RingSpec.for_devices(12, 4, clip=1.0, weight_cap=100)
    rng = np.random.default_rng(1)
    xs = [rng.uniform(-0.9, 0.9, 50) for _ in range(4)]
    ns = [10, 50, 100, 200]  # the last is capped at weight_cap
    acc = np.zeros(51, np.uint64)
    for x, n in zip(xs, ns, strict=True):
        ring.add(acc, ring.encode(x, n, rng))
    values, weight = ring.decode_sum(acc)
    ws = [min(n, 100) / 100 for n in ns]
    expect = sum(w * x for w, x in zip(ws, xs, strict=True))
    assert weight == pytest.approx(sum(ws), abs=4 / ring.levels)
    np.testing.assert_allclose(values, expect, atol=4 * ring.clip / ring.levels)


def test_non_finite_delta_is_refused_not_clipped() -> None:
    ring = RingSpec.for_devices(8, 4, clip=1.0, weight_cap=10)
    with pytest.raises(ValueError, match="not finite"):
        ring.encode(np.array([0.1, np.inf]), 5, np.random.default_rng(0))


def test_masked_vectors_look_uniform_and_inputs_do_not() -> None:
    n = 6
    ring = RingSpec.for_devices(8, n, clip=1.0, weight_cap=10)
    opened = Open(1, os.urandom(16), ring)
    devices = [f"d{i}" for i in range(n)]
    clients = {d: SecAggClient(d, opened) for d in devices}
    server = SecAggServer(opened, 100, 0.5, 20_001)
    for d in devices:
        s = clients[d].advertise()
        server.add_advert(read_body(s, Advertise, L), s)
    roster = server.roster()
    for d in devices:
        server.add_shares(read_body(clients[d].share(roster), ShareBundle, L))
    rng = np.random.default_rng(0)
    bins = 64
    expected = 20_001 / bins
    # 99.9 % quantile of chi-square with 63 degrees of freedom is about 103.4.
    critical = 103.4
    for d, box in server.inboxes().items():
        clients[d].receive(box)
        x = ring.encode(rng.normal(0, 0.1, 20_000), 10, rng)
        y = unpack_bits(read_body(clients[d].masked(x), MaskedInput, L).data, ring.bits, 20_001)
        hist_y = np.bincount((y * bins >> ring.bits).astype(np.int64), minlength=bins)
        hist_x = np.bincount((x * bins >> ring.bits).astype(np.int64), minlength=bins)
        assert ((hist_y - expected) ** 2 / expected).sum() < critical
        assert ((hist_x - expected) ** 2 / expected).sum() > critical  # the test can fail


@pytest.mark.parametrize("bits", [1, 7, 11, 16, 20, 32])
def test_pack_round_trip_is_tight(bits: int) -> None:
    rng = np.random.default_rng(bits)
    v = rng.integers(0, 1 << bits, 1001, dtype=np.uint64)
    blob = pack_bits(v, bits)
    assert len(blob) == (1001 * bits + 7) // 8
    np.testing.assert_array_equal(unpack_bits(blob, bits, 1001), v)
    with pytest.raises(ProtocolError):
        unpack_bits(blob + b"\0", bits, 1001)


def test_pack_layout_is_little_endian_bits() -> None:
    # 3 and 5 in 4 bits: 0x53; 0xABC in 12 bits then 1: bc 1a 00 (LSB first).
    assert pack_bits(np.array([3, 5], np.uint64), 4) == b"\x53"
    assert pack_bits(np.array([0xABC, 1], np.uint64), 12) == bytes([0xBC, 0x1A, 0x00])


def test_shamir_threshold() -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, [1, 2, 3, 4, 5], 3)
    assert shamir.combine(list(shares.items())[2:], 3) == secret
    wire = [shamir.decode_share(shamir.encode_share(x, y)) for x, y in shares.items()]
    assert shamir.combine(wire[:3], 3) == secret
    assert shamir.combine([*list(shares.items())[:2], (9, 1)], 3) != secret
    with pytest.raises(ProtocolError):
        shamir.combine(list(shares.items())[:2], 3)


def test_graph_is_symmetric_and_seeded() -> None:
    ids = [f"d{i}" for i in range(30)]
    g = neighbours(ids, b"s" * 16, 6)
    assert all(len(v) == 6 for v in g.values())
    assert all(a in g[b] for a in ids for b in g[a])
    assert g == neighbours(list(reversed(ids)), b"s" * 16, 6)
    assert g != neighbours(ids, b"t" * 16, 6)


def test_client_refuses_leaky_requests() -> None:
    ring = RingSpec.for_devices(8, 4, clip=1.0, weight_cap=10)
    opened = Open(1, os.urandom(16), ring)
    clients = {d: SecAggClient(d, opened) for d in ("a", "b", "c", "d")}
    server = SecAggServer(opened, 100, 0.5, 3)
    for c in list(clients.values())[:3]:
        s = c.advertise()
        server.add_advert(read_body(s, Advertise, L), s)
    with pytest.raises(ProtocolError, match="our advert"):
        clients["d"].share(server.roster())
    with pytest.raises(ProtocolError, match="both"):
        read_body(Signed.make(Unmask(1, ("a",), ("a",)), None), Unmask, L)


def test_server_refuses_bad_input_without_changing_state() -> None:
    ring = RingSpec.for_devices(8, 4, clip=1.0, weight_cap=10)
    opened = Open(1, os.urandom(16), ring)
    devices = ["a", "b", "c"]
    clients = {d: SecAggClient(d, opened) for d in devices}
    server = SecAggServer(opened, 100, 0.5, 5)
    for d in devices:
        s = clients[d].advertise()
        server.add_advert(read_body(s, Advertise, L), s)
    again = clients["a"].advertise()
    with pytest.raises(ProtocolError, match="twice") as e:
        server.add_advert(read_body(again, Advertise, L), again)
    assert e.value.reason == "duplicate"
    roster = server.roster()
    bundles = {d: read_body(clients[d].share(roster), ShareBundle, L) for d in devices}
    short = ShareBundle(1, "a", bundles["a"].sealed[:1])
    with pytest.raises(ProtocolError, match="one share per neighbour"):
        server.add_shares(short)
    assert "a" not in server.shared
    for b in bundles.values():
        server.add_shares(b)
    with pytest.raises(ProtocolError, match="out of stage"):
        server.add_masked(MaskedInput(1, "a", 5, bytes(ring.packed_bytes(5))))
    boxes = server.inboxes()
    for d in devices:
        clients[d].receive(boxes[d])
    with pytest.raises(ProtocolError) as e:
        server.add_masked(MaskedInput(1, "a", 6, bytes(ring.packed_bytes(6))))
    assert e.value.reason == "shape"
    with pytest.raises(ProtocolError, match="bytes, expected"):
        server.add_masked(MaskedInput(1, "a", 5, bytes(ring.packed_bytes(5) + 1)))
    assert not server.masked
    x = {d: ring.encode(np.full(4, 0.1), 5, np.random.default_rng(0)) for d in devices}
    for d in ("a", "b"):
        server.add_masked(read_body(clients[d].masked(x[d]), MaskedInput, L))
    req = server.unmask_request()
    assert req.dropped == ("c",)
    # "a" offering a seed share of the dropped "c" is refused: it would unmask c's input.
    a_reply = read_body(clients["a"].unmask(req), UnmaskReply, L)
    forged = UnmaskReply(1, "a", (*a_reply.seeds, ("c", a_reply.keys[0][1])), ())
    with pytest.raises(ProtocolError, match="seed share of c"):
        server.add_reply(forged)
    server.add_reply(a_reply)
    server.add_reply(read_body(clients["b"].unmask(req), UnmaskReply, L))
    assert server.ready()
    plain = np.zeros(5, np.uint64)
    ring.add(plain, x["a"])
    ring.add(plain, x["b"])
    np.testing.assert_array_equal(server.finish(), plain)
