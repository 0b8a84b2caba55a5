from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import replace
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.envelopes import (
    HYPER_BOUNDS,
    SCHEMA_VERSION,
    DeviceState,
    DeviceStatus,
    GlobalModel,
    ModelArch,
    ModelUpdate,
    RoundTask,
    TrainHyper,
)
from fedge.errors import FedgeError, InvalidValue, ProtocolError
from fedge.limits import DEFAULT_LIMITS, Limits

ENVELOPES = [RoundTask, ModelUpdate, GlobalModel, DeviceStatus]
FAST = settings(max_examples=40, deadline=None)

# --- strategies --------------------------------------------------------------

device_ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
rounds = st.integers(1, 2**31)
versions = st.integers(0, 2**31)
times = st.floats(min_value=0.0, max_value=1e12, allow_nan=False, allow_infinity=False)
short_text = st.text(max_size=DEFAULT_LIMITS.max_str_len)
nonces = st.binary(min_size=16, max_size=16)
metric_maps = st.dictionaries(
    st.text(max_size=64),
    st.floats(allow_nan=False, allow_infinity=False),
    max_size=DEFAULT_LIMITS.max_map_len,
)

# 1-255 ASCII characters: what fits the signed digests (fedge.identity)
codec_names = st.text(st.characters(min_codepoint=0, max_codepoint=127), min_size=1, max_size=255)

hypers = st.builds(
    TrainHyper,
    epochs=st.integers(1, 1000),
    batch_size=st.integers(1, 65536),
    lr=st.floats(0.0, 100.0, exclude_min=True),
    momentum=st.floats(0.0, 1e6, exclude_max=True),
    weight_decay=st.floats(0.0, 1e6, exclude_max=True),
    prox_mu=st.floats(0.0, 1e6, exclude_max=True),
)

tasks = st.builds(
    RoundTask,
    round=rounds,
    base_version=versions,
    deadline=times,
    codec=codec_names,
    hyper=hypers,
    nonce=nonces,
    selected=st.none() | st.lists(device_ids, max_size=8).map(tuple),
    issued=times,
)

updates = st.builds(
    ModelUpdate,
    device=device_ids,
    round=rounds,
    base_version=versions,
    update_id=short_text,
    nonce=nonces,
    num_samples=st.integers(1, 2**62),
    codec=codec_names,
    delta=st.binary(max_size=4096),
    metrics=metric_maps,
)


@st.composite
def global_models(draw: st.DrawFn) -> GlobalModel:
    onnx = draw(st.binary(max_size=4096))
    return GlobalModel(
        version=draw(versions),
        arch=ModelArch(draw(short_text), draw(st.integers(1, 2**24)), draw(st.integers(1, 2**24))),
        onnx=onnx,
        sha256=hashlib.sha256(onnx).hexdigest(),
        created=draw(times),
        metrics=draw(metric_maps),
    )


statuses = st.builds(
    DeviceStatus,
    device=device_ids,
    state=st.sampled_from(DeviceState),
    version=st.none() | versions,
    ts=times,
)

# Any value msgpack can carry (no ExtType): the raw material of the fuzz tests.
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


# --- helpers -----------------------------------------------------------------


def good_task() -> RoundTask:
    return RoundTask(
        round=3,
        base_version=2,
        deadline=1_700_000_000.0,
        codec="fp16+zstd",
        hyper=TrainHyper(),
        nonce=b"\x01" * 16,
        selected=("dev-a", "dev-b"),
        issued=1_699_999_990.0,
    )


def good_update() -> ModelUpdate:
    return ModelUpdate(
        device="dev-a",
        round=3,
        base_version=2,
        update_id="u-1",
        nonce=b"\x01" * 16,
        num_samples=100,
        codec="fp32",
        delta=b"\x00\x01\x02",
        metrics={"loss": 0.5},
    )


def good_model() -> GlobalModel:
    onnx = b"onnx-bytes"
    return GlobalModel(
        version=7,
        arch=ModelArch("mlp", 20, 4),
        onnx=onnx,
        sha256=hashlib.sha256(onnx).hexdigest(),
        created=1.0,
        metrics={"acc": 0.9},
    )


def good_status() -> DeviceStatus:
    return DeviceStatus(device="dev-a", state=DeviceState.TRAINING, version=7, ts=2.0)


GOOD = {
    RoundTask: good_task,
    ModelUpdate: good_update,
    GlobalModel: good_model,
    DeviceStatus: good_status,
}
OPTIONAL_KEYS = {
    RoundTask: {"selected"},
    ModelUpdate: {"metrics", "signature", "calib"},
    GlobalModel: {"metrics", "chunks", "size", "signature"},
    DeviceStatus: {"version"},
}


def raw_of(cls: type) -> dict[str, Any]:
    """The decoded wire map of a valid envelope of ``cls``, ready to be tampered with."""
    return msgpack.unpackb(GOOD[cls]().to_bytes(), raw=False)


def packed(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def assert_rejected(
    cls: type, payload: bytes, reason: str, limits: Limits = DEFAULT_LIMITS
) -> None:
    with pytest.raises(ProtocolError) as info:
        cls.from_bytes(payload, limits)
    assert info.value.reason == reason, info.value


def only_protocol_errors(cls: type, payload: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        cls.from_bytes(payload)


# --- round trips -------------------------------------------------------------


@FAST
@given(tasks)
def test_round_task_round_trips(task: RoundTask) -> None:
    assert RoundTask.from_bytes(task.to_bytes()) == task


@FAST
@given(updates)
def test_model_update_round_trips(update: ModelUpdate) -> None:
    assert ModelUpdate.from_bytes(update.to_bytes()) == update


@FAST
@given(global_models())
def test_global_model_round_trips(model: GlobalModel) -> None:
    assert GlobalModel.from_bytes(model.to_bytes()) == model


@FAST
@given(statuses)
def test_device_status_round_trips(status: DeviceStatus) -> None:
    decoded = DeviceStatus.from_bytes(status.to_bytes())

    assert decoded == status
    assert isinstance(decoded.state, DeviceState)


@pytest.mark.parametrize("cls", ENVELOPES)
def test_wire_map_carries_version_and_kind(cls: type) -> None:
    raw = raw_of(cls)

    assert raw["v"] == SCHEMA_VERSION
    assert (
        raw["kind"]
        == {
            RoundTask: "task",
            ModelUpdate: "update",
            GlobalModel: "model",
            DeviceStatus: "status",
        }[cls]
    )


@pytest.mark.parametrize("cls", ENVELOPES)
def test_optional_keys_may_be_absent(cls: type) -> None:
    raw = raw_of(cls)
    for key in OPTIONAL_KEYS[cls]:
        raw.pop(key, None)  # fedge leaves some out already when empty (protocol §4)

    decoded = cls.from_bytes(packed(raw))

    assert isinstance(decoded, cls)


# --- rejections --------------------------------------------------------------


@pytest.mark.parametrize("cls", ENVELOPES)
@pytest.mark.parametrize("version", [0, SCHEMA_VERSION + 1, 2**16])
def test_wrong_schema_version(cls: type, version: int) -> None:
    raw = raw_of(cls)
    raw["v"] = version

    assert_rejected(cls, packed(raw), "version")


@pytest.mark.parametrize(
    ("cls", "other"), [(a, b) for a in ENVELOPES for b in ENVELOPES if a is not b]
)
def test_wrong_kind(cls: type, other: type) -> None:
    payload = GOOD[other]().to_bytes()

    assert_rejected(cls, payload, "schema")


@pytest.mark.parametrize("cls", ENVELOPES)
def test_unknown_kind_string(cls: type) -> None:
    raw = raw_of(cls)
    raw["kind"] = "bogus"

    assert_rejected(cls, packed(raw), "schema")


@pytest.mark.parametrize(
    ("cls", "key"),
    [
        (cls, key)
        for cls in ENVELOPES
        for key in sorted(raw_of(cls))
        if key not in OPTIONAL_KEYS[cls]
    ],
)
def test_missing_key(cls: type, key: str) -> None:
    raw = raw_of(cls)
    del raw[key]

    assert_rejected(cls, packed(raw), "schema")


@pytest.mark.parametrize("cls", ENVELOPES)
def test_unknown_extra_key(cls: type) -> None:
    raw = raw_of(cls)
    raw["extra"] = 1

    assert_rejected(cls, packed(raw), "schema")


@pytest.mark.parametrize(("cls", "nested"), [(RoundTask, "hyper"), (GlobalModel, "arch")])
def test_unknown_key_in_nested_map(cls: type, nested: str) -> None:
    raw = raw_of(cls)
    raw[nested]["extra"] = 1

    assert_rejected(cls, packed(raw), "schema")


@pytest.mark.parametrize(
    ("cls", "key", "value"),
    [
        (RoundTask, "round", True),  # bool where int
        (RoundTask, "round", 3.0),
        (RoundTask, "round", "3"),
        (RoundTask, "nonce", "0123456789abcdef"),  # str where bytes
        (RoundTask, "codec", b"fp32"),  # bytes where str
        (RoundTask, "deadline", "soon"),
        (RoundTask, "deadline", True),
        (RoundTask, "hyper", [1, 2]),
        (RoundTask, "selected", "dev-a"),
        (RoundTask, "selected", ["dev-a", 1]),
        (ModelUpdate, "num_samples", True),
        (ModelUpdate, "num_samples", 10.0),
        (ModelUpdate, "delta", "not-bin"),
        (ModelUpdate, "nonce", [1, 2]),
        (ModelUpdate, "device", b"dev-a"),
        (ModelUpdate, "metrics", {"loss": "high"}),
        (ModelUpdate, "metrics", {"loss": True}),
        (ModelUpdate, "metrics", [1.0]),
        (GlobalModel, "onnx", "text"),
        (GlobalModel, "version", False),
        (GlobalModel, "arch", "mlp"),
        (GlobalModel, "sha256", b"\x00" * 32),
        (DeviceStatus, "state", "sleeping"),
        (DeviceStatus, "state", 1),
        (DeviceStatus, "version", True),
        (DeviceStatus, "ts", None),
    ],
)
def test_wrong_type(cls: type, key: str, value: Any) -> None:
    raw = raw_of(cls)
    raw[key] = value

    assert_rejected(cls, packed(raw), "schema")


@pytest.mark.parametrize(
    ("cls", "key", "value"),
    [
        (RoundTask, "round", 0),
        (RoundTask, "round", 2**31 + 1),
        (RoundTask, "round", -1),
        (RoundTask, "base_version", -1),
        (RoundTask, "nonce", b"\x00" * 17),
        (RoundTask, "nonce", b"\x00" * 15),
        (ModelUpdate, "num_samples", 0),
        (ModelUpdate, "num_samples", 2**62 + 1),
        (ModelUpdate, "round", 2**64 - 1),
        (ModelUpdate, "update_id", "x" * (DEFAULT_LIMITS.max_str_len + 1)),
        (ModelUpdate, "metrics", {"k" * 65: 1.0}),
        (ModelUpdate, "metrics", {f"m{i}": 1.0 for i in range(DEFAULT_LIMITS.max_map_len + 1)}),
        (GlobalModel, "version", -(2**63)),
        (DeviceStatus, "version", 2**31 + 1),
        (DeviceStatus, "ts", -1.0),
    ],
)
def test_out_of_range(cls: type, key: str, value: Any) -> None:
    raw = raw_of(cls)
    raw[key] = value

    assert_rejected(cls, packed(raw), "schema")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("epochs", 0),
        ("epochs", 1001),
        ("batch_size", 0),
        ("lr", 0.0),
        ("lr", 100.5),
        ("momentum", -0.1),
        ("momentum", 1e6),  # Fields allows 1e6, TrainHyper does not: still a ProtocolError
        ("prox_mu", math.nan),
    ],
)
def test_hyper_out_of_range(key: str, value: Any) -> None:
    raw = raw_of(RoundTask)
    raw["hyper"][key] = value

    assert_rejected(RoundTask, packed(raw), "schema")


def _hyper_edges() -> list[tuple[str, float, bool]]:
    """(field, value, allowed) just inside and just outside both ends of every bound."""
    out = []
    for name, b in HYPER_BOUNDS.items():
        step = 1 if isinstance(getattr(TrainHyper(), name), int) else 1e-6
        out += [
            (name, b.lo + step if b.lo_open else b.lo, True),
            (name, b.lo if b.lo_open else b.lo - step, False),
            (name, b.hi - step if b.hi_open else b.hi, True),
            (name, b.hi if b.hi_open else b.hi + step, False),
        ]
    return out


@pytest.mark.parametrize(("name", "value", "allowed"), _hyper_edges())
def test_hyper_bounds_are_one_table_for_dataclass_wire_and_config(
    name: str, value: float, allowed: bool
) -> None:
    from pydantic import ValidationError

    from aggregator.config import AggregatorConfig, HyperConfig

    # Prepare
    early = {"val_fraction": 0.1} if name == "early_stop_patience" else {}
    raw = raw_of(RoundTask)
    raw["hyper"].update({name: value, **early})
    config = HyperConfig if name in HyperConfig.model_fields else AggregatorConfig

    # Execute / Assert
    if allowed:
        assert getattr(TrainHyper(**{name: value, **early}), name) == value
        assert getattr(RoundTask.from_bytes(packed(raw)).hyper, name) == value
        assert getattr(config(**{name: value}), name) == value
    else:
        with pytest.raises(InvalidValue, match=name):
            TrainHyper(**{name: value, **early})
        assert_rejected(RoundTask, packed(raw), "schema")
        with pytest.raises(ValidationError, match=name):
            config(**{name: value})


def test_invalid_value_is_a_fedge_error_and_a_value_error() -> None:
    with pytest.raises(FedgeError):
        TrainHyper(epochs=0)
    with pytest.raises(ValueError, match="epochs"):
        TrainHyper(epochs=0)


@pytest.mark.parametrize(("key", "value"), [("input_dim", 0), ("num_classes", 2**24 + 1)])
def test_arch_out_of_range(key: str, value: int) -> None:
    raw = raw_of(GlobalModel)
    raw["arch"][key] = value

    assert_rejected(GlobalModel, packed(raw), "schema")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -1.0])
@pytest.mark.parametrize("key", ["deadline", "issued"])
def test_non_finite_or_negative_times(key: str, value: float) -> None:
    raw = raw_of(RoundTask)
    raw[key] = value

    assert_rejected(RoundTask, packed(raw), "schema")


@pytest.mark.parametrize("cls", ENVELOPES)
def test_oversize_payload(cls: type) -> None:
    payload = GOOD[cls]().to_bytes()
    limits = Limits(max_payload_bytes=len(payload) - 1)

    assert_rejected(cls, payload, "too_large", limits)


@pytest.mark.parametrize("cls", ENVELOPES)
def test_oversize_payload_is_refused_before_parsing(cls: type) -> None:
    payload = b"\xc1" * (DEFAULT_LIMITS.max_payload_bytes + 1)  # 0xc1 is never valid msgpack

    assert_rejected(cls, payload, "too_large")


@pytest.mark.parametrize("cls", ENVELOPES)
def test_payload_at_the_size_limit_is_accepted(cls: type) -> None:
    payload = GOOD[cls]().to_bytes()

    decoded = cls.from_bytes(payload, Limits(max_payload_bytes=len(payload)))

    assert decoded == GOOD[cls]()


def _nested(depth: int) -> bytes:
    return b"\x91" * depth + b"\xc0"  # fixarray of one element, depth times, then nil


@pytest.mark.parametrize("cls", ENVELOPES)
@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xc1", id="never-used-byte"),
        pytest.param(b"\xde\xad\xbe\xef" * 4, id="garbage"),
        pytest.param(packed({"v": 1, "kind": "task"})[:-1], id="truncated"),
        pytest.param(packed({"v": 1}) + b"\x00", id="extra-data"),
        pytest.param(packed({"v": msgpack.ExtType(5, b"x")}), id="ext-type"),
        pytest.param(packed({"v": msgpack.Timestamp(1, 0)}), id="timestamp-ext"),
        pytest.param(_nested(100_000), id="deeply-nested"),
        pytest.param(packed({1: 2}), id="int-key"),
        pytest.param(b"\x81\xa1v\xa2\xff\xfe", id="invalid-utf8"),
    ],
)
def test_bad_msgpack(cls: type, payload: bytes) -> None:
    assert_rejected(cls, payload, "bad_msgpack")


@pytest.mark.parametrize("cls", ENVELOPES)
@pytest.mark.parametrize("top", [[1, 2], 5, "task", None, b"bin", 1.5])
def test_non_map_top_level(cls: type, top: Any) -> None:
    assert_rejected(cls, packed(top), "schema")


@pytest.mark.parametrize("cls", ENVELOPES)
def test_non_bytes_payload(cls: type) -> None:
    assert_rejected(cls, "a string", "schema")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "sha",
    [
        hashlib.sha256(b"other").hexdigest(),
        hashlib.sha256(b"onnx-bytes").hexdigest().upper(),
        "",
    ],
)
def test_global_model_hash_mismatch(sha: str) -> None:
    raw = raw_of(GlobalModel)
    raw["sha256"] = sha

    assert_rejected(GlobalModel, packed(raw), "bad_hash")


@pytest.mark.parametrize("cls", [ModelUpdate, DeviceStatus])
@pytest.mark.parametrize(
    "device", ["", "a/b", "+", "#", "dev a", "-dev", ".dev", "d" * 65, "dév", "a+", "a#"]
)
def test_invalid_device_id(cls: type, device: str) -> None:
    raw = raw_of(cls)
    raw["device"] = device

    assert_rejected(cls, packed(raw), "schema")


@pytest.mark.parametrize("cls", [ModelUpdate, DeviceStatus])
def test_device_id_with_trailing_newline(cls: type) -> None:
    # Regression: the id regex once used '$', which also matches before a final newline.
    raw = raw_of(cls)
    raw["device"] = "dev-a\n"

    assert_rejected(cls, packed(raw), "schema")


def test_round_task_from_bytes_is_not_a_global_model() -> None:
    # The retained topics hold different kinds; a mixed-up payload must never be taken.
    task = good_task().to_bytes()

    assert_rejected(GlobalModel, task, "schema")


# --- fuzz: nothing but ProtocolError escapes -----------------------------------


@settings(max_examples=150, deadline=None)
@given(payload=st.binary(max_size=256))
def test_fuzz_arbitrary_bytes(payload: bytes) -> None:
    for cls in ENVELOPES:
        only_protocol_errors(cls, payload)


@settings(max_examples=150, deadline=None)
@given(obj=msgpack_values)
def test_fuzz_arbitrary_msgpack_values(obj: Any) -> None:
    payload = packed(obj)

    for cls in ENVELOPES:
        only_protocol_errors(cls, payload)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_fuzz_one_field_replaced(data: st.DataObject) -> None:
    # Starting from a valid map reaches the checks behind version and kind.
    cls = data.draw(st.sampled_from(ENVELOPES))
    raw = raw_of(cls)
    nested = {RoundTask: "hyper", GlobalModel: "arch"}.get(cls)
    target = raw
    if nested is not None and data.draw(st.booleans()):
        target = raw[nested]
    key = data.draw(st.sampled_from([*sorted(target), "extra"]))
    target[key] = data.draw(msgpack_values)

    only_protocol_errors(cls, packed(raw))


def test_accepts_from_travels_only_when_set_and_never_beyond_the_round() -> None:
    hyper = TrainHyper()
    plain = RoundTask(5, 4, 2e9, "fp32", hyper, b"n" * 16)
    assert "accepts_from" not in msgpack.unpackb(plain.to_bytes())
    assert plain.oldest_accepted == 5
    async_task = RoundTask(5, 4, 2e9, "fp32", hyper, b"n" * 16, accepts_from=2)
    back = RoundTask.from_bytes(async_task.to_bytes())
    assert (back.accepts_from, back.oldest_accepted) == (2, 2)
    raw = msgpack.unpackb(async_task.to_bytes())
    raw["accepts_from"] = 6
    with pytest.raises(ProtocolError) as e:
        RoundTask.from_bytes(msgpack.packb(raw))
    assert e.value.reason == "schema"


@pytest.mark.parametrize("codec", ["x" * 256, "fp32é", ""])
def test_a_codec_that_does_not_fit_the_signed_digest_is_a_schema_error(codec: str) -> None:
    # The task and update digests carry the codec's length in one byte (fedge.identity).
    from fedge.envelopes import ModelUpdate, RoundTask, TrainHyper
    from fedge.wire import pack

    task = RoundTask(round=1, base_version=0, deadline=1.0, codec="fp32", hyper=TrainHyper(),
                     nonce=bytes(16))  # fmt: skip
    upd = ModelUpdate(device="d", round=1, base_version=0, update_id="u", nonce=bytes(16),
                      num_samples=1, codec="fp32", delta=b"")  # fmt: skip
    for env in (task, upd):
        raw = msgpack.unpackb(env.to_bytes())
        raw["codec"] = codec
        with pytest.raises(ProtocolError) as e:
            type(env).from_bytes(pack(raw))
        assert e.value.reason == "schema"
        assert "codec must be 1-255 ASCII characters" in str(e.value)


def test_task_hyper_leaves_out_defaults_and_reads_them_back() -> None:
    """Default-valued hyper keys and a nil ``selected`` stay off the wire (protocol §5.2); the
    same task written with every key (as before) reads back equal, with the same digest."""
    # Arrange
    task = RoundTask(1, 0, 10.0, "fp32", TrainHyper(epochs=5, lr=0.1), bytes(16))
    full = {
        "epochs": 5, "batch_size": 32, "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0,
        "prox_mu": 0.0, "qat": False, "calibrate": False,
    }  # fmt: skip
    wire = msgpack.unpackb(task.to_bytes())
    old = msgpack.packb({**wire, "hyper": full, "selected": None}, use_bin_type=True)

    # Act
    back = RoundTask.from_bytes(old)

    # Assert
    assert wire["hyper"] == {"epochs": 5, "batch_size": 32, "lr": 0.1}
    assert "selected" not in wire  # nil: every device
    assert back == task
    assert back.digest() == task.digest()
    momentum = replace(task, hyper=TrainHyper(epochs=5, lr=0.1, momentum=0.9))
    assert msgpack.unpackb(momentum.to_bytes())["hyper"]["momentum"] == 0.9
    assert momentum.digest() != task.digest()


def test_negative_zero_hyper_is_signed_as_zero() -> None:
    """-0.0 equals the default, is left out, and must not sign other bytes than 0.0 does."""
    # Arrange
    plain = RoundTask(1, 0, 10.0, "fp32", TrainHyper(), bytes(16))
    signed_zero = replace(plain, hyper=TrainHyper(momentum=-0.0, prox_mu=-0.0))

    # Act
    back = RoundTask.from_bytes(signed_zero.to_bytes())

    # Assert
    assert "momentum" not in msgpack.unpackb(signed_zero.to_bytes())["hyper"]
    assert back.digest() == signed_zero.digest() == plain.digest()


def test_update_without_calibration_leaves_calib_out() -> None:
    """An empty ``calib`` is not sent (protocol §4); with ranges it is, and both read back."""
    # Arrange
    plain = ModelUpdate("d1", 1, 0, "u", bytes(16), 10, "fp32", b"blob")
    ranged = replace(plain, calib={"x": (0.0, 1.0)})

    # Act
    back, back_ranged = (ModelUpdate.from_bytes(u.to_bytes()) for u in (plain, ranged))

    # Assert
    assert "calib" not in msgpack.unpackb(plain.to_bytes())
    assert msgpack.unpackb(ranged.to_bytes())["calib"] == {"x": [0.0, 1.0]}
    assert (back, back_ranged) == (plain, ranged)


def test_receipt_leaves_the_device_to_its_topic() -> None:
    """``device`` is not sent (protocol §5.7); read when present, else the reader's own id."""
    # Arrange
    from fedge.envelopes.status import Receipt

    r = Receipt("dev-01", 7, "3f2a9c1e5b7d4a60")
    old = msgpack.packb({**msgpack.unpackb(r.to_bytes()), "device": "dev-01"})

    # Act / Assert
    assert "device" not in msgpack.unpackb(r.to_bytes())
    assert Receipt.from_bytes(r.to_bytes(), device="dev-01") == r
    assert Receipt.from_bytes(old) == r
    with pytest.raises(ProtocolError):
        Receipt.from_bytes(msgpack.packb({**msgpack.unpackb(old), "device": "a/b"}))
