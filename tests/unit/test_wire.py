from __future__ import annotations

import math
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.errors import InvalidValue, ProtocolError
from fedge.limits import DEFAULT_LIMITS, MAX_PACKET_SIZE, Limits
from fedge.topics import Topics, validate_device_id
from fedge.transport.mqtt import BrokerURL, publish_packet_size
from fedge.wire import Fields, pack, unpack_map

LIMITS = Limits(max_str_len=8, max_map_len=4, max_array_len=16, max_tensors=4)
ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
BAD_IDS = ["", "a/b", "+", "#", "a+", "a#b", "a b", "-a", ".a", "_a", "a" * 65, "dév", "a\tb"]


def reason_of(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(ProtocolError) as info:
        fn(*args, **kwargs)
    return info.value.reason


# --- unpack_map ----------------------------------------------------------------


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_unpack_map_decodes_a_map(wrap: Any) -> None:
    obj = {"a": 1, "b": b"\x00\x01", "c": "text", "d": [1.5, None], "e": {"x": True}}

    assert unpack_map(wrap(pack(obj)), DEFAULT_LIMITS) == obj


def test_pack_uses_bin_for_bytes_and_str_for_text() -> None:
    out = pack({"b": b"\x01", "s": "x"})

    assert out == b"\x82\xa1b\xc4\x01\x01\xa1s\xa1x"


@pytest.mark.parametrize("payload", ["text", None, 5, [1]])
def test_unpack_map_refuses_non_bytes(payload: Any) -> None:
    assert reason_of(unpack_map, payload, DEFAULT_LIMITS) == "schema"


def test_unpack_map_size_limit_is_inclusive() -> None:
    payload = pack({"k": b"x" * 100})

    assert unpack_map(payload, Limits(max_payload_bytes=len(payload)))["k"] == b"x" * 100
    assert reason_of(unpack_map, payload, Limits(max_payload_bytes=len(payload) - 1)) == "too_large"


def test_unpack_map_names_the_message_in_errors() -> None:
    with pytest.raises(ProtocolError, match="status"):
        unpack_map(b"\xc1", DEFAULT_LIMITS, what="status")


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xc1", id="never-used-byte"),
        pytest.param(pack({"a": "bc"})[:-1], id="truncated"),
        pytest.param(pack({"a": 1}) + b"\xc0", id="extra-data"),
        pytest.param(msgpack.packb({"a": msgpack.ExtType(3, b"abc")}), id="ext"),
        pytest.param(msgpack.packb({"a": msgpack.Timestamp(5, 0)}), id="timestamp"),
        pytest.param(msgpack.packb({1: "a"}), id="int-key"),
        pytest.param(msgpack.packb({(1, 2): "a"}), id="array-key"),
        pytest.param(b"\x81\xa1a" + b"\x91" * 5000 + b"\xc0", id="deep-nesting"),
        pytest.param(b"\x81\xa1a\xa2\xc3\x28", id="bad-utf8"),
        pytest.param(pack({f"k{i}": i for i in range(5)}), id="map-too-long"),
        pytest.param(pack({"a": list(range(17))}), id="array-too-long"),
        pytest.param(pack({"a": "x" * (8 * 64 + 1)}), id="str-too-long"),
        pytest.param(b"\x81\xa1a\xdd\xff\xff\xff\xff", id="huge-declared-array"),
        pytest.param(b"\x81\xa1a\xc6\xff\xff\xff\xff", id="huge-declared-bin"),
    ],
)
def test_unpack_map_bad_msgpack(payload: bytes) -> None:
    assert reason_of(unpack_map, payload, LIMITS) == "bad_msgpack"


@pytest.mark.parametrize("top", [[1], 1, "s", b"b", None, True, 2.5])
def test_unpack_map_needs_a_map(top: Any) -> None:
    assert reason_of(unpack_map, pack(top), LIMITS) == "schema"  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(payload=st.binary(max_size=128))
def test_unpack_map_fuzz_raises_only_protocol_error(payload: bytes) -> None:
    try:
        out = unpack_map(payload, LIMITS)
    except ProtocolError:
        return
    assert isinstance(out, dict)


# --- Fields ----------------------------------------------------------------------


def fields(**obj: Any) -> Fields:
    return Fields(obj, "msg", LIMITS)


def test_fields_read_every_type() -> None:
    f = fields(i=3, x=2, s="abc", b=b"\x00", sl=["a", "b"], nm={"k": 1, "z": 0.5}, m={"q": 1})

    got = (f.int("i"), f.float("x"), f.str("s"), f.bytes("b"), f.str_list("sl"), f.number_map("nm"))
    m = f.map("m")
    f.done()

    assert got == (3, 2.0, "abc", b"\x00", ["a", "b"], {"k": 1.0, "z": 0.5})
    assert isinstance(got[1], float)
    assert all(isinstance(v, float) for v in got[5].values())
    assert m == {"q": 1}


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [
        ("int", {}),
        ("float", {}),
        ("str", {}),
        ("bytes", {}),
        ("str_list", {}),
        ("map", {}),
    ],
)
def test_fields_missing_key(method: str, kwargs: dict[str, Any]) -> None:
    f = fields()

    with pytest.raises(ProtocolError, match=r"msg\.k is missing") as info:
        getattr(f, method)("k", **kwargs)

    assert info.value.reason == "schema"


@pytest.mark.parametrize("method", ["int", "float", "str", "bytes", "str_list", "map"])
def test_fields_optional_absent_or_nil(method: str) -> None:
    f = fields(nil=None)

    assert getattr(f, method)("absent", optional=True) is None
    assert getattr(f, method)("nil", optional=True) is None
    f.done()


def test_number_map_is_optional_by_default() -> None:
    f = fields(nil=None)

    assert f.number_map("absent") == {}
    assert f.number_map("nil") == {}


@pytest.mark.parametrize(
    ("method", "value", "kwargs"),
    [
        ("int", True, {}),
        ("int", 1.0, {}),
        ("int", "1", {}),
        ("int", None, {}),
        ("int", -1, {}),
        ("int", 11, {"lo": 0, "hi": 10}),
        ("int", 4, {"lo": 5}),
        ("float", False, {}),
        ("float", "1.0", {}),
        ("float", math.nan, {}),
        ("float", math.inf, {}),
        ("float", -math.inf, {}),
        ("float", 1.5, {"hi": 1.0}),
        ("float", -0.5, {"lo": 0.0}),
        ("str", b"abc", {}),
        ("str", 1, {}),
        ("str", "x" * 9, {}),
        ("str", "c", {"choices": ("a", "b")}),
        ("bytes", "abc", {}),
        ("bytes", bytearray(b"a"), {}),
        ("bytes", b"abcd", {"max_len": 3}),
        ("str_list", "a", {}),
        ("str_list", ["a", 1], {}),
        ("str_list", [b"a"], {}),
        ("str_list", ["x" * 9], {}),
        ("number_map", [1.0], {}),
        ("number_map", {"a": True}, {}),
        ("number_map", {"a": "1"}, {}),
        ("number_map", {"a": math.nan}, {}),
        ("number_map", {"a": math.inf}, {}),
        ("number_map", {b"a": 1.0}, {}),
        ("number_map", {"k" * 65: 1.0}, {}),
        ("number_map", {f"k{i}": 1.0 for i in range(5)}, {}),
        ("map", [1], {}),
        ("map", "m", {}),
    ],
)
def test_fields_reject(method: str, value: Any, kwargs: dict[str, Any]) -> None:
    f = fields(k=value)

    with pytest.raises(ProtocolError, match=r"msg\.k") as info:
        getattr(f, method)("k", **kwargs)

    assert info.value.reason == "schema"


@pytest.mark.parametrize(
    ("method", "value", "kwargs"),
    [
        ("int", 0, {"lo": 0, "hi": 10}),
        ("int", 10, {"lo": 0, "hi": 10}),
        ("int", 2**63 - 1, {}),
        ("float", 1.0, {"lo": 0.0, "hi": 1.0}),
        ("float", 7, {}),
        ("str", "x" * 8, {}),
        ("str", "b", {"choices": ("a", "b")}),
        ("bytes", b"abc", {"max_len": 3}),
        ("str_list", [], {}),
        ("number_map", {"k" * 64: 1}, {}),
    ],
)
def test_fields_accept_boundaries(method: str, value: Any, kwargs: dict[str, Any]) -> None:
    f = fields(k=value)

    got = getattr(f, method)("k", **kwargs)

    expected = {"float": float, "number_map": lambda m: {k: float(v) for k, v in m.items()}}.get(
        method, lambda v: v
    )(value)
    assert got == expected


def test_fields_done_refuses_unknown_keys() -> None:
    f = fields(a=1, b=2, c=3)
    f.int("a")

    with pytest.raises(ProtocolError, match="unknown keys: b, c") as info:
        f.done()

    assert info.value.reason == "schema"


def test_fields_done_counts_an_optional_read_as_seen() -> None:
    f = fields(a=1, opt=None)
    f.int("a")
    f.str("opt", optional=True)

    f.done()


# --- topics ----------------------------------------------------------------------


def test_topics_of_a_fleet() -> None:
    t = Topics("plant-7")

    assert t.prefix == "fedge/plant-7"
    assert t.model == "fedge/plant-7/model/global"
    assert t.task == "fedge/plant-7/round/current"
    assert t.update("dev.01") == "fedge/plant-7/update/dev.01"
    assert t.status("dev_01") == "fedge/plant-7/status/dev_01"
    assert t.all_updates == "fedge/plant-7/update/+"
    assert t.all_statuses == "fedge/plant-7/status/+"


def test_default_fleet() -> None:
    assert Topics().model == "fedge/default/model/global"


@settings(max_examples=50, deadline=None)
@given(fleet=ids, device=ids)
def test_device_of_inverts_update_and_status(fleet: str, device: str) -> None:
    t = Topics(fleet)

    assert t.device_of(t.update(device), "update") == device
    assert t.device_of(t.status(device), "status") == device


@pytest.mark.parametrize(
    ("topic", "kind"),
    [
        ("fedge/f/update/+", "update"),
        ("fedge/f/update/#", "update"),
        ("fedge/f/update/d/x", "update"),
        ("fedge/f/update/", "update"),
        ("fedge/f/update", "update"),
        ("fedge/f/status/d", "update"),
        ("fedge/g/update/d", "update"),
        ("fedge/ff/update/d", "update"),
        ("other/f/update/d", "update"),
        ("fedge/f/model/global", "update"),
        ("fedge/f/update/-d", "update"),
        ("fedge/f/update/" + "d" * 65, "update"),
    ],
)
def test_device_of_rejects(topic: str, kind: str) -> None:
    assert Topics("f").device_of(topic, kind) is None


@pytest.mark.parametrize("fleet", BAD_IDS)
def test_invalid_fleet(fleet: str) -> None:
    with pytest.raises(InvalidValue, match="invalid fleet name"):
        Topics(fleet)


@pytest.mark.parametrize("device", [*BAD_IDS, None, 5])
def test_invalid_device(device: Any) -> None:
    t = Topics("f")

    with pytest.raises(InvalidValue, match="invalid device id"):
        validate_device_id(device)
    with pytest.raises(InvalidValue, match="invalid device id"):
        t.update(device)
    with pytest.raises(InvalidValue, match="invalid device id"):
        t.status(device)


def test_trailing_newline_is_not_an_id() -> None:
    # Regression: the id regex once used '$', which also matches before a final newline.
    with pytest.raises(InvalidValue, match="invalid device id"):
        validate_device_id("dev\n")
    with pytest.raises(InvalidValue, match="invalid fleet name"):
        Topics("f\n")
    assert Topics("f").device_of("fedge/f/update/dev\n", "update") is None


# --- BrokerURL -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://localhost", BrokerURL("localhost", 1883, False)),
        ("mqtts://broker.example.com", BrokerURL("broker.example.com", 8883, True)),
        ("mqtt://10.0.0.2:1884", BrokerURL("10.0.0.2", 1884, False)),
        ("mqtts://h:9999", BrokerURL("h", 9999, True)),
        ("h:1234", BrokerURL("h", 1234, False)),
        ("h", BrokerURL("h", 1883, False)),
        ("mqtt://[::1]:1883", BrokerURL("::1", 1883, False)),
    ],
)
def test_broker_url_parse(url: str, expected: BrokerURL) -> None:
    assert BrokerURL.parse(url) == expected


@pytest.mark.parametrize("url", ["mqtt://h:1", "mqtts://broker.example.com:8883"])
def test_broker_url_str_round_trips(url: str) -> None:
    assert str(BrokerURL.parse(url)) == url


@pytest.mark.parametrize(
    "url",
    [
        "http://h",
        "tcp://h:1883",
        "ws://h",
        "mqtt://",
        "mqtt://:1883",
        "mqtt://h:port",
        "mqtt://h:70000",
        "mqtt://h:-1",
        "",
    ],
)
def test_broker_url_rejects(url: str) -> None:
    with pytest.raises(ValueError, match="broker URL"):
        BrokerURL.parse(url)


def test_broker_url_port_zero_is_refused() -> None:
    with pytest.raises(ValueError, match="port"):
        BrokerURL.parse("mqtt://h:0")


def test_broker_url_str_round_trips_ipv6() -> None:
    url = BrokerURL.parse("mqtt://[::1]:1883")

    assert BrokerURL.parse(str(url)) == url


# --- publish_packet_size -----------------------------------------------------------


def spec_remaining_length(x: int) -> bytes:
    """MQTT 5 section 1.5.5, the encoding algorithm as the spec writes it."""
    out = bytearray()
    while True:
        encoded_byte = x % 128
        x //= 128
        if x > 0:
            encoded_byte |= 128
        out.append(encoded_byte)
        if x <= 0:
            return bytes(out)


def spec_publish_packet(topic: str, payload: bytes, qos: int, mqtt5: bool) -> bytes:
    """A PUBLISH packet built field by field (MQTT 5 section 3.3), with no properties."""
    name = topic.encode("utf-8")
    variable = struct.pack("!H", len(name)) + name
    if qos > 0:
        variable += struct.pack("!H", 1)  # packet identifier
    if mqtt5:
        variable += spec_remaining_length(0)  # property length: no properties
    body = variable + payload
    first = bytes([0x30 | (qos << 1)])
    return first + spec_remaining_length(len(body)) + body


@pytest.mark.parametrize(
    ("remaining", "varint_bytes"),
    [(0, 1), (127, 1), (128, 2), (16383, 2), (16384, 3), (2097151, 3), (2097152, 4)],
)
def test_spec_varint_table(remaining: int, varint_bytes: int) -> None:
    # The spec's own table (1.5.5) pins the helper the next tests rely on.
    assert len(spec_remaining_length(remaining)) == varint_bytes


TOPIC = "fedge/f/update/d1"
VARIABLE_QOS1_V5 = 2 + len(TOPIC) + 2 + 1


@pytest.mark.parametrize(
    "remaining", [127, 128, 16383, 16384, 2097151, 2097152], ids=lambda r: f"remaining={r}"
)
def test_publish_packet_size_across_varint_boundaries(remaining: int) -> None:
    payload = bytes(remaining - VARIABLE_QOS1_V5)

    size = publish_packet_size(TOPIC, len(payload))

    assert size == len(spec_publish_packet(TOPIC, payload, qos=1, mqtt5=True))


@pytest.mark.parametrize(
    ("topic", "payload_len", "qos", "mqtt5"),
    [
        ("t", 0, 1, True),
        ("t", 0, 0, True),
        ("t", 0, 1, False),
        ("t", 100, 0, False),
        ("fedge/default/model/global", 5000, 1, True),
        ("fedge/défaut/status/é", 10, 1, True),
        ("x" * 300, 20000, 2, True),
    ],
)
def test_publish_packet_size_matches_spec_packet(
    topic: str, payload_len: int, qos: int, mqtt5: bool
) -> None:
    expected = len(spec_publish_packet(topic, bytes(payload_len), qos, mqtt5))

    assert publish_packet_size(topic, payload_len, qos=qos, mqtt5=mqtt5) == expected


def test_largest_allowed_payload_fits_the_broker_packet_limit() -> None:
    longest_topic = Topics("f" * 64).update("d" * 64)

    size = publish_packet_size(longest_topic, DEFAULT_LIMITS.max_payload_bytes)

    assert size <= MAX_PACKET_SIZE


def test_our_parsers_raise_the_one_tree() -> None:
    # Broker URLs and raw keys are parsed by fedge: an InvalidValue (a FedgeError, and still
    # a ValueError for pydantic validators), never a bare ValueError.
    from fedge.errors import FedgeError, InvalidValue
    from fedge.identity import SigningKey, VerifyKey
    from fedge.transport.mqtt import BrokerURL

    for bad in (
        lambda: BrokerURL.parse("http://x"),
        lambda: BrokerURL.parse("mqtt://x:0"),
        lambda: VerifyKey.from_bytes(b"short"),
        lambda: SigningKey.from_bytes(b"short"),
    ):
        with pytest.raises(InvalidValue) as e:
            bad()
        assert isinstance(e.value, FedgeError)
