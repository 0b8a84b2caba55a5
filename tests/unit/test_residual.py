"""Error feedback: the residual conserves mass, persists atomically, and feeds the uploads."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edge_agent.residual import RESIDUAL_FILE, Residual
from edge_agent.uplink import Uplink, build_upload, encode_with_feedback
from fedge.codecs import Codec, parse_codec
from fedge.envelopes import RoundTask, TrainHyper
from fedge.limits import DEFAULT_LIMITS

MODEL = {"fc1.weight": (16, 8), "fc1.bias": (16,), "fc2.weight": (3, 16), "fc2.bias": (3,)}
LOSSY = [
    "fp16",
    "int8",
    "int4+zstd",
    "topk:0.1+fp32",
    "topk:0.05+int8+zstd",
    "topk:0.01+int4",
]


def deltas(steps: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Deltas like training makes them: per-tensor scales that differ, some zeros, a spike."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(steps):
        d = {}
        for i, (k, s) in enumerate(MODEL.items()):
            a = rng.standard_normal(s) * 10.0 ** (-i) * (1 + t % 3)
            a[rng.random(s) < 0.2] = 0
            d[k] = a.astype(np.float32)
        d["fc1.weight"][0, 0] = 50.0 if t % 7 == 0 else d["fc1.weight"][0, 0]
        out.append(d)
    return out


def f64(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float64) for k, v in tensors.items()}


# --- apply / update ------------------------------------------------------------------


def test_empty_residual_passes_the_delta_as_float32_copy() -> None:
    delta = {"a": np.array([1.0, -2.0]), "b": np.zeros((2, 2), np.float32)}
    r = Residual()

    target = r.apply(delta)

    assert not r
    assert all(v.dtype == np.float32 for v in target.values())
    np.testing.assert_array_equal(target["a"], [1.0, -2.0])
    target["b"][0, 0] = 5
    assert delta["b"][0, 0] == 0


def test_update_then_apply_adds_what_was_not_sent() -> None:
    r = Residual()
    target = {"a": np.array([1.0, 2.0, 3.0], np.float32)}
    sent = {"a": np.array([1.0, 0.0, 2.5], np.float32)}

    r.update(target, sent)
    nxt = r.apply({"a": np.array([0.5, 0.5, 0.5], np.float32)})

    np.testing.assert_array_equal(r.tensors["a"], [0.0, 2.0, 0.5])
    np.testing.assert_array_equal(nxt["a"], [0.5, 2.5, 1.0])


def test_update_refuses_mismatched_tensors() -> None:
    with pytest.raises(ValueError, match="same tensor names and shapes"):
        Residual().update({"a": np.zeros(3)}, {"a": np.zeros(4)})


def test_apply_resets_when_the_model_changes(caplog: pytest.LogCaptureFixture) -> None:
    r = Residual({"a": np.ones(3, np.float32)})
    caplog.set_level(logging.INFO, logger="edge_agent.residual")

    target = r.apply({"a": np.ones(4, np.float32)})

    np.testing.assert_array_equal(target["a"], np.ones(4))
    assert not r
    assert "dropped" in caplog.text


# --- mass conservation -----------------------------------------------------------------


@pytest.mark.parametrize("spec", LOSSY)
def test_error_feedback_loses_no_mass(spec: str) -> None:
    # Prepare
    codec = parse_codec(spec)
    rng = np.random.default_rng(7)
    r = Residual()
    steps = deltas(60)
    sent_sum = {k: np.zeros(s) for k, s in MODEL.items()}

    # Execute
    for d in steps:
        target = r.apply(d)
        sent = codec.decode(codec.encode(target, rng), MODEL, DEFAULT_LIMITS)
        r.update(target, sent)
        for k in MODEL:
            sent_sum[k] += sent[k]

    # Assert: sum(sent) + residual == sum(delta), up to float32 rounding of each step.
    delta_sum = {k: np.sum([d[k] for d in steps], axis=0, dtype=np.float64) for k in MODEL}
    for k in MODEL:
        scale = np.abs(delta_sum[k]).max() + np.abs(sent_sum[k]).max()
        np.testing.assert_allclose(
            sent_sum[k] + f64(r.tensors)[k], delta_sum[k], rtol=0, atol=60 * 2.0**-22 * scale
        )


@pytest.mark.parametrize("spec", ["topk:0.05+int8+zstd", "topk:0.01+int4"])
def test_without_error_feedback_top_k_loses_mass(spec: str) -> None:
    # The control for the test above: dropping the residual really does lose mass.
    codec = parse_codec(spec)
    rng = np.random.default_rng(7)
    steps = deltas(60)

    sent_sum = sum(
        codec.decode(codec.encode(d, rng), MODEL, DEFAULT_LIMITS)["fc1.weight"].astype(np.float64)
        for d in steps
    )

    delta_sum = np.sum([d["fc1.weight"] for d in steps], axis=0, dtype=np.float64)
    assert np.abs(sent_sum - delta_sum).max() > 1.0


def test_residual_stays_bounded_under_top_k() -> None:
    # Every coordinate is eventually sent: the residual does not grow with the number of steps.
    codec = parse_codec("topk:0.05+fp32")
    r = Residual()
    delta = {"w": np.random.default_rng(1).uniform(0.5, 1.5, 400).astype(np.float32)}

    peaks = []
    for _ in range(300):
        target = r.apply(delta)
        r.update(target, codec.decode(codec.encode(target), {"w": (400,)}, DEFAULT_LIMITS))
        peaks.append(float(np.abs(r.tensors["w"]).max()))

    # 1/0.05 = 20 rounds of mass at most waits; 300 rounds of it would be ~300.
    assert max(peaks[100:]) < 2 * 20 * 1.5
    assert max(peaks[100:]) <= max(peaks[:100]) * 1.5


# --- persistence -------------------------------------------------------------------------


def test_save_and_load_round_trip_exactly(tmp_path: Path) -> None:
    tensors = {
        "fc1.weight": np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32),
        "a/b": np.array([1e-40, -3e38], np.float32),
        "file": np.array(0.5, np.float32),
        "names": np.zeros((0, 2), np.float32),
    }
    Residual(tensors).save(tmp_path)

    loaded = Residual.load(tmp_path, {k: v.shape for k, v in tensors.items()})

    assert list(loaded.tensors) == list(tensors)
    for k, v in tensors.items():
        np.testing.assert_array_equal(loaded.tensors[k], v)
        assert loaded.tensors[k].shape == v.shape
    assert [p.name for p in tmp_path.iterdir()] == [RESIDUAL_FILE]


def test_save_replaces_the_previous_file(tmp_path: Path) -> None:
    Residual({"a": np.ones(3, np.float32)}).save(tmp_path)
    Residual().save(tmp_path)

    assert not Residual.load(tmp_path)


def test_load_missing_is_empty(tmp_path: Path) -> None:
    assert not Residual.load(tmp_path / "nowhere", MODEL)


def test_load_for_another_model_is_empty(tmp_path: Path) -> None:
    Residual({"a": np.ones(3, np.float32)}).save(tmp_path)

    assert not Residual.load(tmp_path, {"a": (4,)})
    assert not Residual.load(tmp_path, {"a": (3,), "b": (1,)})
    assert Residual.load(tmp_path, {"a": (3,)})


@pytest.mark.parametrize(
    "content", [b"", b"not a zip", b"PK\x03\x04garbage"], ids=["empty", "text", "bad-zip"]
)
def test_load_corrupt_file_is_empty(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / RESIDUAL_FILE).write_bytes(content)

    assert not Residual.load(tmp_path)
    assert "unreadable" in caplog.text


# --- the device's upload step (edge_agent.uplink) -------------------------------------------


def task(round_id: int, codec: str) -> RoundTask:
    return RoundTask(
        round=round_id,
        base_version=round_id - 1,
        deadline=0.0,
        codec=codec,
        hyper=TrainHyper(),
        nonce=bytes(16),
    )


class Device:
    """What the agent keeps between rounds for error feedback: its seed, state dir, residual
    (loaded from the dir, as the agent does at start)."""

    def __init__(self, state_dir: Path, seed: int = 3) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.dir = state_dir
        self.uplink = Uplink("dev-0001", seed)
        self.residual = Residual.load(state_dir)

    def encode(self, delta: dict[str, np.ndarray], codec: Codec, t: RoundTask) -> bytes:
        """What EdgeAgent._trained does: build the update, then keep and persist the residual."""
        base = {k: np.zeros_like(v) for k, v in delta.items()}
        up = build_upload(self.uplink, base, Trained(delta), t, codec, self.residual)
        self.residual = up.residual
        if up.save_residual:
            up.residual.save(self.dir)
        return up.update.delta


@dataclass(frozen=True)
class Trained:
    weights: dict[str, np.ndarray]
    num_samples: int = 2
    loss: float = 0.0
    accuracy: float = 0.0
    seconds: float = 0.0


def test_agent_persists_the_residual_and_a_reboot_keeps_it(tmp_path: Path) -> None:
    device = Device(tmp_path)
    codec = parse_codec("topk:0.05+int8+zstd")
    delta = deltas(1)[0]

    blob = device.encode(delta, codec, task(1, codec.name))

    sent = codec.decode(blob, MODEL, DEFAULT_LIMITS)
    rebooted = Device(tmp_path)
    for k in MODEL:
        np.testing.assert_array_equal(rebooted.residual.tensors[k], delta[k] - sent[k])


def test_agent_adds_the_residual_to_the_next_delta(tmp_path: Path) -> None:
    device = Device(tmp_path)
    codec = parse_codec("topk:0.05+fp32")
    d1, d2 = deltas(2)

    sent1 = codec.decode(device.encode(d1, codec, task(1, codec.name)), MODEL, DEFAULT_LIMITS)
    sent2 = codec.decode(device.encode(d2, codec, task(2, codec.name)), MODEL, DEFAULT_LIMITS)

    for k in MODEL:
        np.testing.assert_allclose(
            sent1[k] + sent2[k] + device.residual.tensors[k], d1[k] + d2[k], atol=1e-5
        )


def test_agent_rounds_are_reproducible_per_seed_and_round(tmp_path: Path) -> None:
    codec = parse_codec("int4")
    delta = deltas(1)[0]

    a = Device(tmp_path / "a").encode(delta, codec, task(5, "int4"))
    b = Device(tmp_path / "b").encode(delta, codec, task(5, "int4"))
    c = Device(tmp_path / "c").encode(delta, codec, task(6, "int4"))

    assert a == b
    assert a != c


def test_lossless_round_flushes_and_keeps_no_residual(tmp_path: Path) -> None:
    device = Device(tmp_path)
    lossy, fp32 = parse_codec("topk:0.05+fp32"), parse_codec("fp32")
    d1, d2 = deltas(2)
    device.encode(d1, lossy, task(1, lossy.name))
    left = device.residual.tensors

    blob = device.encode(d2, fp32, task(2, "fp32"))

    sent = fp32.decode(blob, MODEL, DEFAULT_LIMITS)
    for k in MODEL:
        np.testing.assert_array_equal(sent[k], d2[k] + left[k])
    assert not device.residual
    assert not Residual.load(tmp_path)


def test_encoding_leaves_the_given_residual_untouched() -> None:
    residual = Residual({k: np.full(s, 0.5, np.float32) for k, s in MODEL.items()})
    before = residual.tensors
    rng = np.random.default_rng(0)

    _, after, changed = encode_with_feedback(
        deltas(1)[0], parse_codec("topk:0.05+fp32"), residual, rng
    )

    assert changed
    assert after is not residual
    for k in MODEL:
        np.testing.assert_array_equal(residual.tensors[k], before[k])


def test_lossless_round_without_a_residual_has_nothing_to_save() -> None:
    rng = np.random.default_rng(0)

    _, after, changed = encode_with_feedback(deltas(1)[0], parse_codec("fp32"), Residual(), rng)

    assert not after
    assert not changed
