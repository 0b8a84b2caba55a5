"""edge_agent/uplink.py: trained weights in, the bytes of a signed ModelUpdate out, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pytest

from edge_agent.privacy import LocalDP
from edge_agent.residual import Residual
from edge_agent.trainer import TrainResult
from edge_agent.uplink import Uplink, build_upload, calibration, train_metrics
from fedge.codecs import parse_codec
from fedge.envelopes import ModelUpdate, RoundTask, TrainHyper
from fedge.identity import SigningKey
from fedge.limits import DEFAULT_LIMITS

MODEL = {"w": (4, 3), "b": (4,)}


def weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in MODEL.items()}


def task(round_id: int = 4, codec: str = "fp32", **hyper: object) -> RoundTask:
    return RoundTask(round_id, 3, 0.0, codec, TrainHyper(**hyper), b"n" * 16)  # type: ignore[arg-type]


def trained(base: dict[str, np.ndarray], **kw: object) -> TrainResult:
    new = {k: v + np.float32(0.25) for k, v in base.items()}
    return TrainResult(new, 40, 0.5, 0.75, 2.0, **kw)  # type: ignore[arg-type]


def test_the_update_carries_the_round_the_result_and_the_encoded_delta() -> None:
    base, codec, t = weights(0), parse_codec("fp32"), task()
    result = trained(base, epochs=3)
    calib = {"x": (-1.0, 2.0)}

    up = build_upload(
        Uplink("dev-7", seed=5), base, result, t, codec, Residual(), calib=calib, update_id="u1"
    )

    delta = {k: result.weights[k] - base[k] for k in base}
    want = ModelUpdate(
        device="dev-7",
        round=4,
        base_version=3,
        update_id="u1",
        nonce=b"n" * 16,
        num_samples=40,
        codec="fp32",
        delta=codec.encode(delta),
        metrics={"loss": 0.5, "accuracy": 0.75, "seconds": 2.0, "epochs": 3},
        calib=calib,
    )
    assert up.update == want
    assert up.payload == want.to_bytes()
    assert ModelUpdate.from_bytes(up.payload) == want
    assert not up.save_residual


def test_the_update_is_signed_when_the_device_has_a_key() -> None:
    key, base, codec = SigningKey.generate(), weights(1), parse_codec("int8")

    signed = build_upload(
        Uplink("d", signing_key=key), base, trained(base), task(), codec, Residual(), update_id="u"
    )
    plain = build_upload(Uplink("d"), base, trained(base), task(), codec, Residual(), update_id="u")

    assert key.verify_key.verify(signed.update.digest(), signed.update.signature)
    assert replace(signed.update, signature=b"") == plain.update
    assert not plain.update.signature


def test_fresh_update_ids_unless_pinned() -> None:
    base, codec = weights(2), parse_codec("fp32")
    ids = {
        build_upload(Uplink("d"), base, trained(base), task(), codec, Residual()).update.update_id
        for _ in range(3)
    }

    assert len(ids) == 3
    assert all(len(i) == 32 for i in ids)


def test_local_dp_clips_before_the_codec() -> None:
    base = weights(3)
    dp = LocalDP(clip_norm=0.1, noise_multiplier=0.0)

    up = build_upload(
        Uplink("d", local_dp=dp), base, trained(base), task(), parse_codec("fp32"), Residual()
    )

    sent = parse_codec("fp32").decode(up.update.delta, MODEL, DEFAULT_LIMITS)
    norm = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in sent.values()))
    assert norm == pytest.approx(0.1, rel=1e-5)


def test_local_dp_noise_is_reproducible_with_a_pinned_rng() -> None:
    base, codec = weights(4), parse_codec("fp32")
    uplink = Uplink("d", local_dp=LocalDP(clip_norm=1.0, noise_multiplier=1.0))

    def blob(seed: int) -> bytes:
        rng = np.random.default_rng(seed)
        up = build_upload(uplink, base, trained(base), task(), codec, Residual(), dp_rng=rng)
        return up.update.delta

    assert blob(1) == blob(1)
    assert blob(1) != blob(2)


def test_the_given_residual_is_not_modified_and_the_new_one_is_returned() -> None:
    base, codec = weights(5), parse_codec("topk:0.2+fp32")
    residual = Residual()

    up = build_upload(Uplink("d"), base, trained(base), task(codec=codec.name), codec, residual)

    assert not residual
    assert up.residual
    assert up.save_residual


def test_metrics_report_epochs_and_validation_loss_only_when_there_are_some() -> None:
    @dataclass(frozen=True)
    class Bare:  # a simulated train function's result: no epochs, no val_loss
        weights: dict[str, np.ndarray]
        num_samples: int = 1
        loss: float = 0.1
        accuracy: float = 0.2
        seconds: float = 0.3

    base = weights(6)

    assert train_metrics(Bare(base)) == {"loss": 0.1, "accuracy": 0.2, "seconds": 0.3}
    assert train_metrics(trained(base, epochs=0)) == {"loss": 0.5, "accuracy": 0.75, "seconds": 2.0}
    assert train_metrics(trained(base, epochs=2, val_loss=0.4)) == {
        "loss": 0.5,
        "accuracy": 0.75,
        "seconds": 2.0,
        "epochs": 2,
        "val_loss": 0.4,
    }


def test_no_calibration_unless_the_round_asks() -> None:
    assert calibration(Uplink("d"), b"not onnx", np.zeros((2, 3), np.float32), task()) == {}


def test_calibration_that_fails_is_left_out(caplog: pytest.LogCaptureFixture) -> None:
    t = task(calibrate=True)

    got = calibration(Uplink("dev-9"), b"not onnx", np.zeros((2, 3), np.float32), t)

    assert got == {}
    assert "dev-9: no calibration ranges for round 4" in caplog.text
