from __future__ import annotations

import contextlib
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
from fedge.codecs.zstd_frame import decompress_capped
from fedge.errors import InvalidValue, ProtocolError
from fedge.limits import DEFAULT_LIMITS, Limits

SPECS = ["fp32", "fp16", "fp16+zstd", "fp32+zstd"]
FP32_SPECS = ["fp32", "fp32+zstd"]
FP16_SPECS = ["fp16", "fp16+zstd"]
ZSTD_SPECS = ["fp16+zstd", "fp32+zstd"]
DTYPE = {"fp32": "<f4", "fp16": "<f2"}
FP16_MAX = 65504.0
FP16_SMALLEST_NORMAL = 2.0**-14
BOMB_SIZE = 64 * 1024 * 1024
SMALL_CAP = 1024 * 1024

MODEL = {"w": (3, 4), "b": (4,)}

names = st.from_regex(r"\A[a-z][a-z0-9_.]{0,15}\Z")
shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)


def deltas(elements: st.SearchStrategy[float]) -> st.SearchStrategy[dict[str, np.ndarray]]:
    return st.dictionaries(
        names,
        shapes.flatmap(lambda s: hnp.arrays(np.float32, s, elements=elements)),
        min_size=1,
        max_size=4,
    )


fp32_values = st.floats(width=32, allow_nan=False, allow_infinity=False)
fp16_normal_magnitudes = st.floats(FP16_SMALLEST_NORMAL, FP16_MAX, width=32)
fp16_normal_values = (
    st.just(0.0) | fp16_normal_magnitudes | fp16_normal_magnitudes.map(lambda x: -x)
)


def spec_of(delta: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k: v.shape for k, v in delta.items()}


def model_delta(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in MODEL.items()}


def blob_of(spec: str, records: Any) -> bytes:
    """A hand-built delta: msgpack records, in a zstd frame when the codec says so."""
    raw = msgpack.packb(records, use_bin_type=True)
    return zstandard.ZstdCompressor().compress(raw) if spec.endswith("+zstd") else raw


def record(name: str, arr: np.ndarray, dtype: str) -> list[Any]:
    a = np.asarray(arr, dtype=dtype)
    return [name, dtype, list(a.shape), a.tobytes()]


def good_records(spec: str) -> list[list[Any]]:
    dtype = DTYPE[spec.split("+")[0]]
    return [record(k, v, dtype) for k, v in model_delta().items()]


def assert_rejected(spec: str, blob: bytes, reason: str, limits: Limits = DEFAULT_LIMITS) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_codec(spec).decode(blob, MODEL, limits)
    assert info.value.reason == reason, info.value


# --- parse_codec ---------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS)
def test_parse_codec_names(spec: str) -> None:
    assert parse_codec(spec).name == spec


@pytest.mark.parametrize(("text", "name"), [(" FP16+ZSTD ", "fp16+zstd"), ("Fp32", "fp32")])
def test_parse_codec_ignores_case_and_spaces(text: str, name: str) -> None:
    assert parse_codec(text).name == name


@pytest.mark.parametrize(
    "text", ["", "fp8", "int3", "zstd", "fp16+zstd+zstd", "zstd+fp16", "fp16+gzip", "fp16+", None]
)
def test_parse_codec_unknown_lists_choices(text: Any) -> None:
    with pytest.raises(InvalidValue, match="unknown codec") as info:
        parse_codec(text)

    message = str(info.value)
    assert all(choice in message for choice in ("fp32", "fp16", "zstd"))


# --- round trips ---------------------------------------------------------------


@pytest.mark.parametrize("spec", FP32_SPECS)
@settings(max_examples=30, deadline=None)
@given(delta=deltas(fp32_values))
def test_fp32_round_trip_is_exact(spec: str, delta: dict[str, np.ndarray]) -> None:
    codec = parse_codec(spec)

    out = codec.decode(codec.encode(delta), spec_of(delta), DEFAULT_LIMITS)

    assert list(out) == list(delta)
    for k, v in delta.items():
        assert out[k].dtype == np.float32
        assert out[k].shape == v.shape
        np.testing.assert_array_equal(out[k], v)


@pytest.mark.parametrize("spec", FP16_SPECS)
@settings(max_examples=30, deadline=None)
@given(delta=deltas(fp16_normal_values))
def test_fp16_round_trip_within_half_ulp(spec: str, delta: dict[str, np.ndarray]) -> None:
    codec = parse_codec(spec)

    out = codec.decode(codec.encode(delta), spec_of(delta), DEFAULT_LIMITS)

    for k, v in delta.items():
        assert out[k].dtype == np.float32
        assert out[k].shape == v.shape
        np.testing.assert_allclose(out[k], v, rtol=2.0**-11, atol=0)
        np.testing.assert_array_equal(out[k], v.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("spec", FP16_SPECS)
def test_fp16_clips_huge_values_to_finite(spec: str) -> None:
    codec = parse_codec(spec)
    values = np.array([1e30, -1e30, 7e4, -7e4, 65519.0, np.finfo(np.float32).max], np.float32)
    expected = np.sign(values) * FP16_MAX

    out = codec.decode(codec.encode({"a": values}), {"a": (6,)}, DEFAULT_LIMITS)

    assert np.isfinite(out["a"]).all()
    np.testing.assert_array_equal(out["a"], expected)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (0, 0, 2), (1,), (2, 3, 4)])
def test_zeros_are_exact(spec: str, shape: tuple[int, ...]) -> None:
    codec = parse_codec(spec)
    delta = {"a": np.zeros(shape, np.float32)}

    out = codec.decode(codec.encode(delta), {"a": shape}, DEFAULT_LIMITS)

    assert out["a"].shape == shape
    np.testing.assert_array_equal(out["a"], np.zeros(shape, np.float32))


@pytest.mark.parametrize("spec", SPECS)
def test_scalar_tensor_round_trips(spec: str) -> None:
    # Regression: np.ascontiguousarray once turned a 0-d tensor into shape (1,) on encode.
    codec = parse_codec(spec)
    delta = {"t": np.array(0.25, np.float32)}

    out = codec.decode(codec.encode(delta), {"t": ()}, DEFAULT_LIMITS)

    assert out["t"].shape == ()
    np.testing.assert_array_equal(out["t"], np.float32(0.25))


@pytest.mark.parametrize("spec", SPECS)
def test_decode_returns_spec_order(spec: str) -> None:
    codec = parse_codec(spec)
    delta = model_delta()
    reversed_spec = dict(reversed(list(MODEL.items())))

    out = codec.decode(codec.encode(delta), reversed_spec, DEFAULT_LIMITS)

    assert list(out) == list(reversed_spec)


@pytest.mark.parametrize("spec", SPECS)
def test_encode_accepts_float64_input(spec: str) -> None:
    codec = parse_codec(spec)
    delta = {"a": np.array([0.5, -2.0, 1024.0])}

    out = codec.decode(codec.encode(delta), {"a": (3,)}, DEFAULT_LIMITS)

    np.testing.assert_array_equal(out["a"], np.array([0.5, -2.0, 1024.0], np.float32))


def test_zstd_blob_is_smaller_for_redundant_data() -> None:
    delta = {"a": np.zeros(10_000, np.float32)}

    plain = parse_codec("fp32").encode(delta)
    packed = parse_codec("fp32+zstd").encode(delta)

    assert len(packed) < len(plain) // 10


# --- decoder rejections ----------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda r: [[f"x{rec[0]}", *rec[1:]] for rec in r], id="wrong-names"),
        pytest.param(lambda r: r[:1], id="missing-tensor"),
        pytest.param(lambda r: [*r, ["extra", *r[0][1:]]], id="extra-tensor"),
        pytest.param(lambda r: [r[0], r[0]], id="duplicate"),
        pytest.param(lambda r: [], id="empty"),
    ],
)
def test_tensor_set_mismatch(spec: str, edit: Any) -> None:
    assert_rejected(spec, blob_of(spec, edit(good_records(spec))), "bad_tensor")


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", [[4, 3], [12], [3, 4, 1], [3, 5], []])
def test_wrong_shape(spec: str, shape: list[int]) -> None:
    records = good_records(spec)
    records[0][2] = shape

    assert_rejected(spec, blob_of(spec, records), "bad_tensor")


@pytest.mark.parametrize(
    ("spec", "dtype"),
    [
        ("fp32", "<f2"),
        ("fp32", "<f8"),
        ("fp32", ">f4"),
        ("fp32+zstd", "<i4"),
        ("fp16", "<f4"),
        ("fp16", ">f2"),
        ("fp16+zstd", "<f4"),
    ],
)
def test_wrong_dtype(spec: str, dtype: str) -> None:
    records = good_records(spec)
    records[0] = record(records[0][0], model_delta()["w"], dtype)

    assert_rejected(spec, blob_of(spec, records), "bad_tensor")


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("change", [-1, 1, -100])
def test_data_byte_count_mismatch(spec: str, change: int) -> None:
    records = good_records(spec)
    data = records[0][3]
    records[0][3] = data[:change] if change < 0 else data + b"\x00" * change

    assert_rejected(spec, blob_of(spec, records), "bad_tensor")


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize(
    ("index", "value"),
    [
        pytest.param(0, None, id="record-not-a-list"),
        pytest.param(2, [3, "4"], id="shape-not-ints"),
        pytest.param(2, [3, True], id="shape-with-bool"),
        pytest.param(3, "text", id="data-not-bin"),
    ],
)
def test_malformed_record(spec: str, index: int, value: Any) -> None:
    records = good_records(spec)
    if value is None:
        records.append(5)
    else:
        records[0][index] = value

    with pytest.raises(ProtocolError) as info:
        parse_codec(spec).decode(blob_of(spec, records), MODEL, DEFAULT_LIMITS)

    assert info.value.reason in {"schema", "bad_tensor"}


@pytest.mark.parametrize("spec", SPECS)
def test_record_with_wrong_field_count(spec: str) -> None:
    records = good_records(spec)
    records[0] = records[0][:3]

    assert_rejected(spec, blob_of(spec, records), "schema")


@pytest.mark.parametrize("spec", FP32_SPECS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_fp32_non_finite(spec: str, bad: float) -> None:
    records = good_records(spec)
    w = model_delta()["w"].copy()
    w[1, 2] = bad
    records[0] = record("w", w, "<f4")

    assert_rejected(spec, blob_of(spec, records), "non_finite")


@pytest.mark.parametrize("spec", FP16_SPECS)
@pytest.mark.parametrize(
    "bits", [0x7C00, 0xFC00, 0x7E00, 0x7C01], ids=["inf", "-inf", "nan", "snan"]
)
def test_fp16_non_finite(spec: str, bits: int) -> None:
    records = good_records(spec)
    raw = np.frombuffer(records[1][3], dtype="<u2").copy()
    raw[0] = bits
    records[1][3] = raw.tobytes()

    assert_rejected(spec, blob_of(spec, records), "non_finite")


@pytest.mark.parametrize("spec", ["fp32", "fp16"])
@pytest.mark.parametrize(
    "blob",
    [b"", b"\xc1", b"\x92\x01", msgpack.packb([msgpack.ExtType(1, b"x")]), b"\x91" * 100_000],
    ids=["empty", "never-used", "truncated", "ext", "nested"],
)
def test_plain_garbage_is_bad_msgpack(spec: str, blob: bytes) -> None:
    assert_rejected(spec, blob, "bad_msgpack")


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("top", [{"w": 1}, "w", 5])
def test_non_array_top_level(spec: str, top: Any) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_codec(spec).decode(blob_of(spec, top), MODEL, DEFAULT_LIMITS)

    assert info.value.reason in {"schema", "bad_msgpack"}


# --- zstd: bombs and broken frames -----------------------------------------------


@pytest.fixture(scope="module")
def zeros_64mb() -> bytes:
    return bytes(BOMB_SIZE)


@pytest.fixture(scope="module")
def declared_bomb(zeros_64mb: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_content_size=True).compress(zeros_64mb)


@pytest.fixture(scope="module")
def undeclared_bomb(zeros_64mb: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_content_size=False).compress(zeros_64mb)


def peak_while_rejected(spec: str, blob: bytes, limits: Limits, reason: str) -> int:
    codec = parse_codec(spec)
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError) as info:
            codec.decode(blob, MODEL, limits)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.reason == reason, info.value
    return peak


@pytest.mark.parametrize("spec", ZSTD_SPECS)
def test_declared_size_bomb_is_refused_without_expanding(spec: str, declared_bomb: bytes) -> None:
    assert zstandard.frame_content_size(declared_bomb) == BOMB_SIZE
    assert len(declared_bomb) < 64 * 1024

    peak = peak_while_rejected(
        spec, declared_bomb, Limits(max_decompressed_bytes=SMALL_CAP), "too_large"
    )

    assert peak < SMALL_CAP // 4


@pytest.mark.parametrize("spec", ZSTD_SPECS)
def test_undeclared_size_bomb_is_refused_without_expanding(
    spec: str, undeclared_bomb: bytes
) -> None:
    # The protocol requires a declared content size, so a bomb without one is refused up front.
    assert zstandard.frame_content_size(undeclared_bomb) == -1

    peak = peak_while_rejected(
        spec, undeclared_bomb, Limits(max_decompressed_bytes=SMALL_CAP), "bad_zstd"
    )

    assert peak < SMALL_CAP // 4


@pytest.mark.parametrize("spec", ZSTD_SPECS)
def test_honest_frame_without_declared_size_is_refused(spec: str) -> None:
    raw = msgpack.packb(good_records(spec), use_bin_type=True)
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(raw)

    assert_rejected(spec, frame, "bad_zstd")


@pytest.mark.parametrize("spec", ZSTD_SPECS)
def test_frame_exactly_at_the_cap_is_accepted(spec: str) -> None:
    codec = parse_codec(spec)
    delta = model_delta()
    blob = codec.encode(delta)
    size = zstandard.frame_content_size(blob)

    out = codec.decode(blob, MODEL, Limits(max_decompressed_bytes=size))

    assert list(out) == list(MODEL)
    assert_rejected(spec, blob, "too_large", Limits(max_decompressed_bytes=size - 1))


@pytest.mark.parametrize("spec", ZSTD_SPECS)
@pytest.mark.parametrize(
    "cut",
    [lambda n: n // 2, lambda n: n - 1, lambda n: 3],
    ids=["half", "minus-one", "header-only"],
)
def test_truncated_frame(spec: str, cut: Any) -> None:
    blob = parse_codec(spec).encode(model_delta())

    assert_rejected(spec, blob[: cut(len(blob))], "bad_zstd")


@pytest.mark.parametrize("spec", ZSTD_SPECS)
@pytest.mark.parametrize("blob", [b"", b"\x00" * 16, b"not zstd at all"])
def test_not_a_zstd_frame(spec: str, blob: bytes) -> None:
    assert_rejected(spec, blob, "bad_zstd")


@pytest.mark.parametrize("spec", ZSTD_SPECS)
def test_corrupt_frame_body(spec: str) -> None:
    blob = bytearray(parse_codec(spec).encode(model_delta()))
    for i in range(len(blob) // 2, len(blob)):
        blob[i] ^= 0xFF

    with pytest.raises(ProtocolError) as info:
        parse_codec(spec).decode(bytes(blob), MODEL, DEFAULT_LIMITS)

    assert info.value.reason in {"bad_zstd", "bad_msgpack"}


def test_truncated_frame_without_declared_size_is_bad_zstd() -> None:
    # Regression: a stream reader stops quietly at the end of the input; this was partial data.
    data = np.arange(100_000, dtype=np.float32).tobytes()
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(data)

    with pytest.raises(ProtocolError) as info:
        decompress_capped(frame[: len(frame) // 2], cap=len(data))

    assert info.value.reason == "bad_zstd"


# --- fuzz ------------------------------------------------------------------------

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.sampled_from(["w", "b", "<f4", "<f2"])
    | st.binary(max_size=64),
    lambda inner: st.lists(inner, max_size=5),
    max_leaves=20,
)


@settings(max_examples=100, deadline=None)
@given(spec=st.sampled_from(SPECS), blob=st.binary(max_size=256))
def test_fuzz_bytes_raise_only_protocol_error(spec: str, blob: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        parse_codec(spec).decode(blob, MODEL, DEFAULT_LIMITS)


@settings(max_examples=150, deadline=None)
@given(spec=st.sampled_from(SPECS), obj=msgpack_values)
def test_fuzz_records_raise_only_protocol_error(spec: str, obj: Any) -> None:
    with contextlib.suppress(ProtocolError):
        parse_codec(spec).decode(blob_of(spec, obj), MODEL, DEFAULT_LIMITS)


@pytest.mark.parametrize(
    ("records", "spec"),
    [
        pytest.param([[1, "<f4", [2], bytes(8)]], {"1": (2,)}, id="int-name-vs-'1'"),
        pytest.param([5], {"None": (2,)}, id="non-record-vs-'None'"),
        pytest.param([[None, "<f4", [2], bytes(8)]], {"None": (2,)}, id="nil-name-vs-'None'"),
    ],
)
def test_non_string_tensor_name_is_a_protocol_error(
    records: list[Any], spec: dict[str, tuple[int, ...]]
) -> None:
    # Regression: names were compared through str(), so these reached spec[name] and leaked
    # KeyError / TypeError.
    blob = msgpack.packb(records, use_bin_type=True)

    with pytest.raises(ProtocolError) as info:
        parse_codec("fp32").decode(blob, spec, DEFAULT_LIMITS)

    assert info.value.reason == "schema"
