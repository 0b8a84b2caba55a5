"""int8 / int4 / topk codecs: names, error bounds, unbiasedness, byte layout, rejections."""

from __future__ import annotations

import contextlib
import math
import tracemalloc
from typing import Any

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedge.codecs import parse_codec
from fedge.codecs.sparse import decode_gaps, encode_gaps
from fedge.errors import ProtocolError
from fedge.limits import DEFAULT_LIMITS, Limits

QUANT = {"int8": 127, "int4": 7}
QUANT_SPECS = ["int8", "int4", "int8+zstd", "int4+zstd"]
TOPK_SPECS = [
    "topk:0.05+fp32",
    "topk:0.1+fp16",
    "topk:0.05+int8",
    "topk:0.01+int4",
    "topk:0.05+int8+zstd",
    "topk:0.3+int4+zstd",
]
LOSSY_SPECS = QUANT_SPECS + TOPK_SPECS + ["fp16", "fp16+zstd"]
CLIP = 2.0**127
TINY = 2.0**-149  # smallest binary32 subnormal

MODEL = {"w": (3, 4), "b": (4,)}

shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6)
magnitudes = st.sampled_from([0.0, TINY, 1e-40, 1e-30, 1e-8, 1.0, 1e10, 1e30, CLIP])
finite32 = st.floats(-CLIP, CLIP, width=32)


def arrays(elements: st.SearchStrategy[float]) -> st.SearchStrategy[np.ndarray]:
    return shapes.flatmap(lambda s: hnp.arrays(np.float32, s, elements=elements))


# One scale of magnitude per example, values spread below it: zeros, tiny, huge, mixed.
scaled_arrays = st.tuples(arrays(st.floats(-1, 1, width=32)), magnitudes).map(
    lambda t: (t[0] * np.float32(t[1])).astype(np.float32)
)
any_arrays = scaled_arrays | arrays(finite32)


def roundtrip(spec: str, delta: dict[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    codec = parse_codec(spec)
    blob = codec.encode(delta, np.random.default_rng(seed))
    return codec.decode(blob, {k: v.shape for k, v in delta.items()}, DEFAULT_LIMITS)


def channel_max(x: np.ndarray) -> np.ndarray:
    """max |x| of each output channel, broadcast back to x's shape (independent of the codec)."""
    a = np.abs(x.astype(np.float64))
    if x.ndim < 2:
        return np.full(x.shape, a.max(initial=0.0))
    return np.broadcast_to(a.max(axis=tuple(range(1, x.ndim)), keepdims=True, initial=0.0), x.shape)


def plain(spec: str, blob: bytes) -> list[Any]:
    """The msgpack records of a blob, unwrapping zstd when the codec says so."""
    if spec.endswith("+zstd"):
        blob = zstandard.ZstdDecompressor().decompress(blob)
    return msgpack.unpackb(blob, raw=False)


def blob_of(spec: str, records: Any) -> bytes:
    raw = msgpack.packb(records, use_bin_type=True)
    return zstandard.ZstdCompressor().compress(raw) if spec.endswith("+zstd") else raw


def rejected(spec: str, records: Any, model: dict[str, tuple[int, ...]] = MODEL) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_codec(spec).decode(blob_of(spec, records), model, DEFAULT_LIMITS)
    return info.value


def good_records(spec: str, seed: int = 0) -> list[list[Any]]:
    rng = np.random.default_rng(seed)
    delta = {k: rng.standard_normal(s).astype(np.float32) for k, s in MODEL.items()}
    return plain(spec, parse_codec(spec).encode(delta, np.random.default_rng(seed)))


def leb128(values: list[int]) -> bytes:
    """Reference unsigned LEB128, written from the format's definition."""
    out = bytearray()
    for v in values:
        while True:
            byte, v = v & 0x7F, v >> 7
            out.append(byte | (0x80 if v else 0))
            if not v:
                break
    return bytes(out)


# --- names ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "int8",
        "int4",
        "int8+zstd",
        "int4+zstd",
        "topk:0.05+fp32",
        "topk:0.05+int8",
        "topk:0.01+int4",
        "topk:0.05+int8+zstd",
        "topk:0.1+fp16+zstd",
        "topk:1.0+fp32",
        "topk:1e-05+int8",
    ],
)
def test_canonical_names_are_stable(name: str) -> None:
    assert parse_codec(name).name == name


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("topk:0.05", "topk:0.05+fp32"),
        ("topk:0.05+zstd", "topk:0.05+fp32+zstd"),
        (" TOPK:.05+INT8+ZSTD ", "topk:0.05+int8+zstd"),
        ("topk:5e-2+int4", "topk:0.05+int4"),
        ("topk:1+int8", "topk:1.0+int8"),
        ("Int4", "int4"),
    ],
)
def test_aliases_map_to_canonical_names(text: str, name: str) -> None:
    assert parse_codec(text).name == name


@pytest.mark.parametrize(
    "text",
    [
        "int16",
        "topk:0+int8",
        "topk:1.5+int8",
        "topk:-0.1+int8",
        "topk:nan+int8",
        "topk:inf",
        "topk:abc+int8",
        "topk:+int8",
        "topk:0.1+",
        "int8+topk:0.1",
        "topk:0.1+topk:0.1+int8",
        "topk:0.1+int8+fp16",
        "int8+zstd+zstd",
        "zstd+int8",
    ],
)
def test_bad_names_are_refused_with_the_grammar(text: str) -> None:
    with pytest.raises(ValueError, match="unknown codec") as info:
        parse_codec(text)

    assert "[topk:FRACTION+]VALUE[+zstd]" in str(info.value)


@pytest.mark.parametrize(
    ("name", "lossless"),
    [
        ("fp32", True),
        ("fp32+zstd", True),
        ("fp16", False),
        ("int8+zstd", False),
        ("topk:0.5+fp32", False),
        ("topk:1.0+fp32", True),
        ("topk:1.0+int8", False),
    ],
)
def test_lossless_flag(name: str, lossless: bool) -> None:
    assert parse_codec(name).lossless is lossless


# --- int8 / int4: error bound, layout, unbiasedness ----------------------------------


@pytest.mark.parametrize("spec", QUANT_SPECS)
@settings(max_examples=60, deadline=None)
@given(x=any_arrays, seed=st.integers(0, 2**32 - 1))
def test_quant_round_trip_within_one_scale(spec: str, x: np.ndarray, seed: int) -> None:
    qmax = QUANT[spec.split("+")[0]]
    # The scale is the smallest binary32 >= max|x_c| / qmax; the product q*s rounds once.
    bound = channel_max(x) / qmax * (1 + 2.0**-20) + channel_max(x) * 2.0**-23 + TINY

    out = roundtrip(spec, {"t": x}, seed)["t"]

    assert out.dtype == np.float32
    assert out.shape == x.shape
    assert np.isfinite(out).all()
    err = np.abs(out.astype(np.float64) - x.astype(np.float64))
    assert (err <= bound).all(), float((err - bound).max())


@pytest.mark.parametrize("spec", QUANT_SPECS)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (0, 3), (1,), (2, 3, 4)])
def test_quant_zeros_are_exact(spec: str, shape: tuple[int, ...]) -> None:
    out = roundtrip(spec, {"a": np.zeros(shape, np.float32)})["a"]

    assert out.shape == shape
    np.testing.assert_array_equal(out, np.zeros(shape, np.float32))


@pytest.mark.parametrize("spec", ["int8", "int4"])
def test_quant_clips_beyond_2_pow_127(spec: str) -> None:
    x = np.array([np.finfo(np.float32).max, -3e38, 1.0], np.float32)

    out = roundtrip(spec, {"a": x})["a"]

    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[:2], [CLIP, -CLIP], rtol=2.0**-20)


@pytest.mark.parametrize("spec", ["int8", "int4"])
def test_quant_refuses_non_finite_input(spec: str) -> None:
    with pytest.raises(ValueError, match="NaN or Inf"):
        parse_codec(spec).encode({"a": np.array([1.0, np.nan], np.float32)})


def reference_quant_decode(rec: list[Any], bits: int) -> np.ndarray:
    """Decode one q8/q4 record straight from the documented layout."""
    _, _, shape, scales, data = rec
    n = math.prod(shape)
    channels = shape[0] if len(shape) >= 2 else 1
    s = np.frombuffer(scales, "<f4")
    assert len(s) == channels
    if bits == 8:
        codes = list(np.frombuffer(data, np.int8))
    else:
        codes = []
        for byte in data:
            for nibble in (byte & 0x0F, byte >> 4):
                codes.append(nibble - 16 if nibble >= 8 else nibble)
        assert len(codes) == n + n % 2
        assert n % 2 == 0 or codes[-1] == 0
        codes = codes[:n]
    per = n // channels if channels else 0
    flat = [np.float32(c) * s[i // per] if per else 0.0 for i, c in enumerate(codes)]
    return np.array(flat, np.float32).reshape(shape)


@pytest.mark.parametrize(("name", "bits"), [("int8", 8), ("int4", 4)])
@pytest.mark.parametrize("shape", [(5, 3), (4,), (), (2, 3, 3), (3, 1)])
def test_quant_layout_matches_the_documented_format(
    name: str, bits: int, shape: tuple[int, ...]
) -> None:
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 3, size=shape)).astype(np.float32)
    codec = parse_codec(name)

    blob = codec.encode({"a": x}, np.random.default_rng(4))
    (rec,) = msgpack.unpackb(blob, raw=False)

    assert rec[:3] == ["a", "q8" if bits == 8 else "q4", list(shape)]
    np.testing.assert_array_equal(
        codec.decode(blob, {"a": shape}, DEFAULT_LIMITS)["a"], reference_quant_decode(rec, bits)
    )


@pytest.mark.parametrize(("name", "qmax"), [("int8", 127), ("int4", 7)])
def test_quant_scales_are_per_output_channel(name: str, qmax: int) -> None:
    x = np.array([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0], [-100.0, 3.0, 2.0]], np.float32)

    (rec,) = msgpack.unpackb(parse_codec(name).encode({"w": x}), raw=False)

    scales = np.frombuffer(rec[3], "<f4")
    expected = np.array([1.0, 0.0, 100.0]) / qmax
    np.testing.assert_allclose(scales, expected, rtol=2.0**-23)
    assert (scales.astype(np.float64) >= expected).all()


@pytest.mark.parametrize(("name", "qmax"), [("int8", 127), ("int4", 7)])
def test_stochastic_rounding_is_unbiased(name: str, qmax: int) -> None:
    # Prepare: one channel whose max fixes the scale; values all over the grid.
    x = np.concatenate(
        [[1.0], np.random.default_rng(0).uniform(-1, 1, 500), [0.0, 0.5, -1.0]]
    ).astype(np.float32)
    codec = parse_codec(name)
    trials = 3000
    rng = np.random.default_rng(12345)

    # Execute
    total = np.zeros(x.shape, np.float64)
    for _ in range(trials):
        total += codec.decode(codec.encode({"a": x}, rng), {"a": x.shape}, DEFAULT_LIMITS)["a"]
    mean = total / trials

    # Assert: the tolerance follows from the variance s^2 f (1 - f) of one rounding.
    s = np.float64(np.float32(1.0 / qmax))
    if s < 1.0 / qmax:
        s = np.nextafter(np.float32(s), np.float32(2)).astype(np.float64)
    f = x / s - np.floor(x / s)
    std_of_mean = s * np.sqrt(f * (1 - f) / trials)
    tol = 6 * std_of_mean + 1e-6 * s
    assert (np.abs(mean - x) <= tol).all(), float(np.max(np.abs(mean - x) - tol))
    # The same test catches a biased (round-to-nearest) quantizer: its error here is ~s/4.
    nearest = np.round(x / s) * s
    assert (np.abs(nearest - x) > tol).any()


# --- topk ------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["topk:0.05+fp32", "topk:0.3+fp32+zstd", "topk:1.0+fp32"])
@settings(max_examples=60, deadline=None)
@given(tensors=st.lists(any_arrays, min_size=1, max_size=3))
def test_topk_keeps_the_global_largest_exactly(spec: str, tensors: list[np.ndarray]) -> None:
    fraction = float(spec.split(":")[1].split("+")[0])
    delta = {f"t{i}": x for i, x in enumerate(tensors)}
    flat = np.concatenate([x.reshape(-1) for x in tensors])

    out = roundtrip(spec, delta)
    got = np.concatenate([out[k].reshape(-1) for k in delta])

    # One top-k over the whole delta: count, exact values, nothing dropped above a kept one.
    kept = got != 0
    assert kept.sum() == min(np.count_nonzero(flat), math.ceil(fraction * flat.size))
    np.testing.assert_array_equal(got[kept], flat[kept])
    dropped = np.abs(flat[~kept])
    if kept.any() and dropped.size:
        assert np.abs(flat[kept]).min() >= dropped.max()


def test_topk_budget_goes_where_the_update_is_large() -> None:
    delta = {
        "big": np.full(100, 5.0, np.float32),
        "small": np.full(100, 0.1, np.float32),
        "zero": np.zeros(50, np.float32),
    }
    delta["small"][7] = 9.0

    out = roundtrip("topk:0.1+fp32", delta)

    assert np.count_nonzero(out["big"]) == 24
    np.testing.assert_array_equal(np.flatnonzero(out["small"]), [7])
    assert not out["zero"].any()


@pytest.mark.parametrize(("spec", "qmax"), [("topk:0.1+int8", 127), ("topk:0.2+int4+zstd", 7)])
@settings(max_examples=60, deadline=None)
@given(x=any_arrays, seed=st.integers(0, 2**32 - 1))
def test_topk_quantized_error_bound(spec: str, qmax: int, x: np.ndarray, seed: int) -> None:
    fraction = float(spec.split(":")[1].split("+")[0])
    flat = np.abs(x.reshape(-1).astype(np.float64))
    k = min(np.count_nonzero(flat), math.ceil(fraction * flat.size))
    order = np.sort(flat)[::-1]
    largest = order[0] if k else 0.0
    largest_dropped = order[k] if k < flat.size else 0.0
    # Dropped entries err by at most the largest dropped |x|; kept ones by one scale (the
    # kept values of a tensor share one scale, max kept |x| / qmax).
    bound = max(largest_dropped, largest / qmax * (1 + 2.0**-20) + largest * 2.0**-23 + TINY)

    out = roundtrip(spec, {"t": x}, seed)["t"]

    assert np.isfinite(out).all()
    assert np.count_nonzero(out) <= k
    assert np.abs(out.astype(np.float64) - x.astype(np.float64)).max(initial=0.0) <= bound


def test_topk_layout_matches_the_documented_example() -> None:
    x = np.array([[0, -0.25], [0, 1.0]], np.float32)

    blob = parse_codec("topk:0.5+fp32").encode({"linear.weight": x})

    expected = (
        b"\x91\x97\xad"
        + b"linear.weight"
        + b"\xa4topk\x92\x02\x02\x02\xc4\x02\x02\x02\xa3<f4"
        + b"\xc4\x08\x00\x00\x80\xbe\x00\x00\x80\x3f"
    )
    assert blob == expected


@settings(max_examples=200, deadline=None)
@given(
    n=st.sampled_from([1, 2, 127, 128, 129, 16384, 16385, 2**21 + 1, 2**26]),
    data=st.data(),
)
def test_index_gaps_round_trip_and_match_reference_leb128(n: int, data: Any) -> None:
    picks = data.draw(st.lists(st.integers(0, n - 1), max_size=50, unique=True))
    idx = np.array(sorted(picks), np.int64)
    gaps = np.diff(idx, prepend=-1).tolist()

    buf = encode_gaps(idx)

    assert buf == leb128(gaps)
    np.testing.assert_array_equal(decode_gaps(buf, len(idx), n, "t"), idx)


# --- rejections ----------------------------------------------------------------------


def topk_record(idx_bytes: bytes, k: int, values: bytes | None = None) -> list[Any]:
    vals = values if values is not None else np.ones(k, "<f4").tobytes()
    return ["w", "topk", [3, 4], k, idx_bytes, "<f4", vals]


def topk_blob_records(w_record: list[Any]) -> list[list[Any]]:
    b = ["b", "topk", [4], 0, b"", "<f4", b""]
    return [w_record, b]


@pytest.mark.parametrize(
    ("idx", "k", "reason", "words"),
    [
        pytest.param(leb128([1, 12]), 2, "bad_index", "out of range", id="out-of-range"),
        pytest.param(leb128([13]), 1, "bad_index", "out of range", id="first-out-of-range"),
        pytest.param(leb128([3, 0]), 2, "bad_index", "duplicate", id="duplicate"),
        pytest.param(leb128([0]), 1, "bad_index", "duplicate", id="gap-zero-first"),
        pytest.param(b"\x83", 1, "bad_index", "truncated", id="truncated-varint"),
        pytest.param(leb128([1, 2]), 3, "bad_count", "3", id="fewer-indices-than-k"),
        pytest.param(leb128([1, 2, 3]), 2, "bad_index", "index bytes", id="more-bytes-than-k"),
        pytest.param(leb128([1]) + leb128([1]), 1, "bad_index", "index bytes", id="trailing"),
        pytest.param(b"", 13, "bad_count", "k=13", id="k-above-n"),
        pytest.param(b"", -1, "bad_count", "k=-1", id="k-negative"),
    ],
)
def test_topk_bad_indices_and_counts(idx: bytes, k: int, reason: str, words: str) -> None:
    records = topk_blob_records(topk_record(idx, k, np.ones(max(k, 0), "<f4").tobytes()))

    err = rejected("topk:0.5+fp32", records)

    assert err.reason == reason, err
    assert words in err.detail


@pytest.mark.parametrize(
    ("idx", "k", "words"),
    [
        pytest.param(b"\x82\x00", 1, "not minimal", id="non-minimal"),
        pytest.param(b"\x81\x80\x01\x01", 2, "longer than 2 bytes", id="3-byte-varint"),
        pytest.param(b"\x81\x80\x80\x80\x00", 1, "index bytes", id="5-byte-varint"),
    ],
)
def test_topk_index_varint_form(idx: bytes, k: int, words: str) -> None:
    # n = 300 needs gaps of up to 2 bytes; anything longer or padded is refused.
    rec = ["v", "topk", [300], k, idx, "<f4", np.ones(k, "<f4").tobytes()]

    err = rejected("topk:0.5+fp32", [rec], {"v": (300,)})

    assert err.reason == "bad_index"
    assert words in err.detail


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        (np.ones(1, "<f4").tobytes(), "bad_count"),
        (np.ones(3, "<f4").tobytes(), "bad_count"),
        (np.ones(2, "<f2").tobytes(), "bad_count"),
    ],
)
def test_topk_value_count_must_match_k(values: bytes, reason: str) -> None:
    records = topk_blob_records(topk_record(leb128([1, 2]), 2, values))

    assert rejected("topk:0.5+fp32", records).reason == reason


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        pytest.param(lambda r: r.__setitem__(3, True), "schema", id="k-bool"),
        pytest.param(lambda r: r.__setitem__(3, 1.0), "schema", id="k-float"),
        pytest.param(lambda r: r.__setitem__(4, [1]), "schema", id="indices-not-bin"),
        pytest.param(lambda r: r.__setitem__(5, "<f2"), "bad_tensor", id="wrong-value-tag"),
        pytest.param(lambda r: r.__setitem__(1, "q8"), "bad_tensor", id="dense-tag"),
        pytest.param(lambda r: r.__setitem__(2, [4, 3]), "bad_tensor", id="wrong-shape"),
        pytest.param(lambda r: r.pop(), "schema", id="missing-field"),
        pytest.param(lambda r: r.__setitem__(6, "x"), "schema", id="values-not-bin"),
    ],
)
def test_topk_malformed_record(edit: Any, reason: str) -> None:
    rec = topk_record(leb128([1, 2]), 2)
    edit(rec)

    assert rejected("topk:0.5+fp32", topk_blob_records(rec)).reason == reason


def test_topk_non_finite_value_is_refused() -> None:
    rec = topk_record(leb128([1, 2]), 2, np.array([1.0, np.inf], "<f4").tobytes())

    assert rejected("topk:0.5+fp32", topk_blob_records(rec)).reason == "non_finite"


@pytest.mark.parametrize("spec", ["int8", "int4+zstd", "topk:0.5+int8", "topk:0.5+int4+zstd"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, -1.0], ids=["nan", "inf", "-inf", "neg"])
def test_bad_scale(spec: str, bad: float) -> None:
    records = good_records(spec)
    field = 3 if spec.startswith("int") else 6
    scales = np.frombuffer(records[0][field], "<f4").copy()
    scales[0] = bad
    records[0][field] = scales.tobytes()

    assert rejected(spec, records).reason == "bad_scale"


@pytest.mark.parametrize("spec", ["int8", "int4"])
def test_huge_scale_that_overflows_is_non_finite(spec: str) -> None:
    records = good_records(spec)
    records[0][3] = np.full(3, np.finfo(np.float32).max, "<f4").tobytes()
    records[0][4] = bytes([0x77]) * len(records[0][4])  # codes 119 / (7, 7): product overflows

    assert rejected(spec, records).reason == "non_finite"


@pytest.mark.parametrize(
    ("spec", "field", "change"),
    [
        ("int8", 3, -4),
        ("int8", 3, 4),
        ("int8", 4, -1),
        ("int8", 4, 1),
        ("int4", 4, -1),
        ("int4", 4, 1),
        ("int4+zstd", 3, -1),
    ],
)
def test_quant_wrong_lengths(spec: str, field: int, change: int) -> None:
    records = good_records(spec)
    data = records[0][field]
    records[0][field] = data[:change] if change < 0 else data + b"\x00" * change

    assert rejected(spec, records).reason == "bad_tensor"


@pytest.mark.parametrize(
    ("spec", "code", "words"),
    [("int8", 0x80, "-128"), ("int4", 0x08, "-8"), ("int4", 0x80, "-8")],
)
def test_quant_out_of_range_codes(spec: str, code: int, words: str) -> None:
    records = good_records(spec)
    data = bytearray(records[0][4])
    data[0] = code
    records[0][4] = bytes(data)

    err = rejected(spec, records)

    assert err.reason == "bad_tensor"
    assert words in err.detail


def test_int4_padding_nibble_must_be_zero() -> None:
    rec = ["v", "q4", [3], np.ones(1, "<f4").tobytes(), bytes([0x11, 0x71])]

    err = rejected("int4", [rec], {"v": (3,)})

    assert err.reason == "bad_tensor"
    assert "padding" in err.detail


@pytest.mark.parametrize(
    ("spec", "tag"), [("int8", "q4"), ("int4", "q8"), ("int8", "<f4"), ("int8", "topk")]
)
def test_quant_wrong_tag(spec: str, tag: str) -> None:
    records = good_records(spec)
    records[0][1] = tag

    assert rejected(spec, records).reason == "bad_tensor"


@pytest.mark.parametrize("spec", QUANT_SPECS + TOPK_SPECS)
@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda r: r[:1], id="missing-tensor"),
        pytest.param(lambda r: [r[0], r[0]], id="duplicate-tensor"),
        pytest.param(lambda r: [[f"x{rec[0]}", *rec[1:]] for rec in r], id="wrong-names"),
    ],
)
def test_tensor_set_mismatch(spec: str, edit: Any) -> None:
    assert rejected(spec, edit(good_records(spec))).reason == "bad_tensor"


# --- bounded work ----------------------------------------------------------------------


def peak_bytes(fn: Any) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_declared_count_never_sizes_an_allocation() -> None:
    # A 4-million-element tensor; the peer declares k = n but sends two index bytes, and
    # another declares k = 2**40. Neither may allocate by k (16 MB) before being refused.
    big = {"w": (2000, 2000)}
    blobs = [
        msgpack.packb([["w", "topk", [2000, 2000], 4_000_000, b"\x01\x01", "<f4", b""]]),
        msgpack.packb([["w", "topk", [2000, 2000], 2**40, b"\x01", "<f4", b""]]),
    ]
    codec = parse_codec("topk:0.01+fp32")
    for blob in blobs:

        def decode(blob: bytes = blob) -> None:
            with pytest.raises(ProtocolError) as info:
                codec.decode(blob, big, DEFAULT_LIMITS)
            assert info.value.reason == "bad_count"

        assert peak_bytes(decode) < 256 * 1024


def test_long_index_stream_is_refused_before_decoding() -> None:
    # 1 MB of continuation bytes for k = 1: refused on its length, not scanned.
    blob = msgpack.packb([["w", "topk", [2000, 2000], 1, b"\x80" * 2**20, "<f4", b"\0" * 4]])
    codec = parse_codec("topk:0.01+fp32")

    def decode() -> None:
        with pytest.raises(ProtocolError) as info:
            codec.decode(blob, {"w": (2000, 2000)}, DEFAULT_LIMITS)
        assert info.value.reason == "bad_index"

    assert peak_bytes(decode) < 2**20 + 256 * 1024  # the bin msgpack hands us, nothing more


@pytest.mark.parametrize("spec", ["int8+zstd", "topk:0.05+int8+zstd"])
def test_zstd_bomb_is_refused_without_expanding(spec: str) -> None:
    bomb = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(64 * 2**20))
    codec = parse_codec(spec)
    limits = Limits(max_decompressed_bytes=2**20)

    def decode() -> None:
        with pytest.raises(ProtocolError) as info:
            codec.decode(bomb, MODEL, limits)
        assert info.value.reason == "too_large"

    assert peak_bytes(decode) < 2**18


@pytest.mark.parametrize("spec", ["int8+zstd", "topk:0.05+int4+zstd"])
@pytest.mark.parametrize("cut", [0.5, 0.9], ids=["half", "most"])
def test_truncated_frame(spec: str, cut: float) -> None:
    blob = parse_codec(spec).encode({k: np.ones(s, np.float32) for k, s in MODEL.items()})

    with pytest.raises(ProtocolError) as info:
        parse_codec(spec).decode(blob[: int(len(blob) * cut)], MODEL, DEFAULT_LIMITS)

    assert info.value.reason == "bad_zstd"


# --- fuzz ------------------------------------------------------------------------------

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.sampled_from(["w", "b", "topk", "q8", "q4", "<f4"])
    | st.binary(max_size=32),
    lambda inner: st.lists(inner, max_size=8),
    max_leaves=24,
)


@settings(max_examples=200, deadline=None)
@given(spec=st.sampled_from(QUANT_SPECS + TOPK_SPECS), obj=msgpack_values)
def test_fuzz_records_raise_only_protocol_error(spec: str, obj: Any) -> None:
    with contextlib.suppress(ProtocolError):
        parse_codec(spec).decode(blob_of(spec, obj), MODEL, DEFAULT_LIMITS)


@settings(max_examples=200, deadline=None)
@given(
    spec=st.sampled_from(["topk:0.5+fp32", "topk:0.5+int4"]),
    k=st.integers(-2, 14),
    idx=st.binary(max_size=16),
    vals=st.binary(max_size=64),
)
def test_fuzz_topk_fields_raise_only_protocol_error(
    spec: str, k: int, idx: bytes, vals: bytes
) -> None:
    tail = ["<f4", vals] if spec.endswith("fp32") else ["q4", np.ones(1, "<f4").tobytes(), vals]
    records = [["w", "topk", [3, 4], k, idx, *tail], ["b", "topk", [4], 0, b"", *tail[:-1], b""]]

    with contextlib.suppress(ProtocolError):
        out = parse_codec(spec).decode(blob_of(spec, records), MODEL, DEFAULT_LIMITS)
        assert np.count_nonzero(out["w"]) <= max(k, 0)
