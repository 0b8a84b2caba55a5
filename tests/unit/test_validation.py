from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from aggregator.rounds import OpenRound
from aggregator.validation import Accepted, validate_update
from fedge.codecs import parse_codec
from fedge.envelopes import ModelUpdate, RoundTask, TrainHyper
from fedge.errors import InvalidUpdate, ProtocolError
from fedge.limits import DEFAULT_LIMITS

SPEC = {"fc.weight": (3, 2), "fc.bias": (3,)}
NONCE = bytes(range(16))
MAX_SAMPLES = 5000
DEVICE = "dev-1"


def make_task(**changes: Any) -> RoundTask:
    task = RoundTask(
        round=5,
        base_version=4,
        deadline=1000.0,
        codec="fp32",
        hyper=TrainHyper(),
        nonce=NONCE,
    )
    return replace(task, **changes)


def make_delta(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SPEC.items()}


def make_payload(delta: dict[str, np.ndarray] | None = None, **changes: Any) -> bytes:
    fields: dict[str, Any] = {
        "device": DEVICE,
        "round": 5,
        "base_version": 4,
        "update_id": "u-1",
        "nonce": NONCE,
        "num_samples": 120,
        "codec": "fp32",
        "metrics": {"loss": 0.25},
    }
    fields.update(changes)
    blob = parse_codec(fields["codec"]).encode(make_delta() if delta is None else delta)
    return ModelUpdate(delta=blob, **fields).to_bytes()


def validate(payload: bytes, rnd: OpenRound | None = None, topic_device: str = DEVICE) -> Accepted:
    return validate_update(
        topic_device,
        payload,
        OpenRound(task=make_task(), opened_at=0.0) if rnd is None else rnd,
        SPEC,
        DEFAULT_LIMITS,
        MAX_SAMPLES,
    )


def test_accepts_a_good_update() -> None:
    delta = make_delta(7)

    acc = validate(make_payload(delta))

    assert acc.num_samples == 120
    assert acc.clamped is False
    assert acc.update.device == DEVICE
    assert acc.update.update_id == "u-1"
    assert acc.update.metrics == {"loss": 0.25}
    assert list(acc.delta) == list(SPEC)
    for k in SPEC:
        assert acc.delta[k].dtype == np.float32
        np.testing.assert_array_equal(acc.delta[k], delta[k])


def test_accepts_fp16_zstd_round() -> None:
    delta = make_delta(8)
    rnd = OpenRound(task=make_task(codec="fp16+zstd"), opened_at=0.0)

    acc = validate(make_payload(delta, codec="fp16+zstd"), rnd)

    for k in SPEC:
        np.testing.assert_allclose(acc.delta[k], delta[k], rtol=2.0**-11)


def test_accepts_a_selected_device() -> None:
    rnd = OpenRound(task=make_task(selected=("other", DEVICE)), opened_at=0.0)

    acc = validate(make_payload(), rnd)

    assert acc.update.device == DEVICE


def test_accepts_when_other_devices_were_counted() -> None:
    rnd = OpenRound(task=make_task(), opened_at=0.0, counted={"other": "u-9"})

    assert validate(make_payload(), rnd).update.device == DEVICE


@pytest.mark.parametrize(
    ("reason", "payload_changes", "task_changes", "counted", "topic_device"),
    [
        ("device_mismatch", {}, {}, {}, "dev-2"),
        ("wrong_round", {"round": 4}, {}, {}, DEVICE),
        ("wrong_round", {"round": 6}, {}, {}, DEVICE),
        ("bad_nonce", {"nonce": bytes(16)}, {}, {}, DEVICE),
        ("wrong_base", {"base_version": 3}, {}, {}, DEVICE),
        ("wrong_codec", {"codec": "fp16"}, {}, {}, DEVICE),
        ("wrong_codec", {"codec": "fp32+zstd"}, {}, {}, DEVICE),
        ("not_selected", {}, {"selected": ("dev-2", "dev-3")}, {}, DEVICE),
        ("not_selected", {}, {"selected": ()}, {}, DEVICE),
        ("duplicate", {}, {}, {DEVICE: "u-0"}, DEVICE),
    ],
)
def test_round_rules(
    reason: str,
    payload_changes: dict[str, Any],
    task_changes: dict[str, Any],
    counted: dict[str, str],
    topic_device: str,
) -> None:
    rnd = OpenRound(task=make_task(**task_changes), opened_at=0.0, counted=dict(counted))

    with pytest.raises(InvalidUpdate) as info:
        validate(make_payload(**payload_changes), rnd, topic_device)

    assert info.value.reason == reason


def test_duplicate_is_not_recorded_by_validation() -> None:
    # Counting is the service's job once the update is folded; validation leaves rnd alone.
    rnd = OpenRound(task=make_task(), opened_at=0.0)

    validate(make_payload(), rnd)

    assert rnd.counted == {}


@pytest.mark.parametrize(
    ("reason", "delta"),
    [
        (
            "bad_tensor",
            {"fc.weight": np.zeros((2, 3), np.float32), "fc.bias": np.zeros(3, np.float32)},
        ),
        ("bad_tensor", {"fc.weight": np.zeros((3, 2), np.float32)}),
        (
            "bad_tensor",
            {
                "fc.weight": np.zeros((3, 2), np.float32),
                "fc.bias": np.zeros(3, np.float32),
                "fc.extra": np.zeros(1, np.float32),
            },
        ),
        (
            "non_finite",
            {"fc.weight": np.full((3, 2), np.nan, np.float32), "fc.bias": np.zeros(3, np.float32)},
        ),
        (
            "non_finite",
            {
                "fc.weight": np.zeros((3, 2), np.float32),
                "fc.bias": np.array([0, np.inf, 0], np.float32),
            },
        ),
    ],
)
def test_delta_rejections(reason: str, delta: dict[str, np.ndarray]) -> None:
    with pytest.raises(ProtocolError) as info:
        validate(make_payload(delta))

    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xc1", "bad_msgpack"),
        (RoundTask(1, 0, 0.0, "fp32", TrainHyper(), b"").to_bytes(), "schema"),
    ],
)
def test_envelope_rejections(payload: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        validate(payload)

    assert not isinstance(info.value, InvalidUpdate)
    assert info.value.reason == reason


def test_round_rules_are_checked_before_the_delta_is_decoded() -> None:
    # A wrong-round update carrying a broken delta is refused for its round, not its delta.
    payload = ModelUpdate(
        device=DEVICE,
        round=6,
        base_version=4,
        update_id="u",
        nonce=NONCE,
        num_samples=1,
        codec="fp32",
        delta=b"\xc1 not a delta",
    ).to_bytes()

    with pytest.raises(InvalidUpdate) as info:
        validate(payload)

    assert info.value.reason == "wrong_round"


@pytest.mark.parametrize(
    ("sent", "expected", "clamped"),
    [
        (MAX_SAMPLES + 1, MAX_SAMPLES, True),
        (2**62, MAX_SAMPLES, True),
        (MAX_SAMPLES, MAX_SAMPLES, False),
    ],
)
def test_num_samples_clamp(sent: int, expected: int, clamped: bool) -> None:
    acc = validate(make_payload(num_samples=sent))

    assert acc.num_samples == expected
    assert acc.clamped is clamped
    assert acc.update.num_samples == sent
