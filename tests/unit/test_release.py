"""The release manifest (fedge/envelopes/release.py) and what a device checks on it
(fedge/release_check.py): the cohort rule, the signed bytes, refusals."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest

from fedge.envelopes import (
    DeviceState,
    DeviceStatus,
    ReleaseManifest,
    ReleaseMode,
    ShadowReport,
    cohort_bound,
    cohort_hash,
    in_cohort,
)
from fedge.errors import InvalidValue, ProtocolError
from fedge.identity import SigningKey
from fedge.release_check import check_release

SHA_A = hashlib.sha256(b"a").hexdigest()
SHA_B = hashlib.sha256(b"b").hexdigest()


def manifest(seq: int = 1, stage: int = 0, **kw: object) -> ReleaseManifest:
    stages = (0.05, 0.25, 1.0)
    base: dict[str, object] = {
        "fleet": "f1",
        "seq": seq,
        "version": 7,
        "sha256": SHA_A,
        "previous": 5,
        "previous_sha256": SHA_B,
        "stage": stage,
        "stages": stages,
        "cohort": cohort_bound(stages[stage]),
        "mode": ReleaseMode.CANARY,
        "max_regression": 1.0,
        "issued": 1700000000.0,
    }
    base.update(kw)
    return ReleaseManifest(**base)  # type: ignore[arg-type]


def test_cohort_hash_is_the_first_eight_bytes_of_sha256_of_fleet_bar_device() -> None:
    expected = int.from_bytes(hashlib.sha256(b"f1|dev-3").digest()[:8], "big")
    assert cohort_hash("f1", "dev-3") == expected


def test_cohort_bounds_are_exact_and_nest() -> None:
    assert cohort_bound(1.0) == 2**64 - 1
    assert cohort_bound(0.5) == 2**63 - 1
    devices = [f"dev-{i}" for i in range(2000)]
    small = {d for d in devices if in_cohort("f1", d, cohort_bound(0.05))}
    large = {d for d in devices if in_cohort("f1", d, cohort_bound(0.25))}
    assert small < large
    # A uniform hash: 5 % and 25 % of 2,000 devices, within 4 standard deviations.
    assert abs(len(small) - 100) < 4 * (2000 * 0.05 * 0.95) ** 0.5
    assert abs(len(large) - 500) < 4 * (2000 * 0.25 * 0.75) ** 0.5
    with pytest.raises(InvalidValue):
        cohort_bound(0.0)


def test_manifest_round_trips_and_serves_candidate_inside_previous_outside() -> None:
    m = manifest()
    back = ReleaseManifest.from_bytes(m.to_bytes())
    assert back == m
    inside = next(d for d in (f"d{i}" for i in range(500)) if in_cohort("f1", d, m.cohort))
    outside = next(d for d in (f"d{i}" for i in range(500)) if not in_cohort("f1", d, m.cohort))
    assert (m.serves(inside), m.serves(outside)) == (7, 5)


def test_signed_manifest_verifies_and_every_field_is_signed() -> None:
    key = SigningKey.generate()
    m = manifest()
    signed = replace(m, signature=key.sign(m.digest()))
    assert check_release(signed, key.verify_key, "f1", None) == signed
    for change in (
        {"seq": 2},
        {"version": 8},
        {"previous": 4},
        {"stage": 1, "cohort": cohort_bound(0.25)},
        {"mode": ReleaseMode.DIRECT},
        {"max_regression": 5.0},
    ):
        forged = replace(signed, **change)  # type: ignore[arg-type]
        with pytest.raises(ProtocolError) as e:
            check_release(forged, key.verify_key, "f1", None)
        assert e.value.reason == "bad_signature"


def test_unsigned_stale_and_foreign_manifests_are_refused() -> None:
    key = SigningKey.generate()

    def signed(m: ReleaseManifest) -> ReleaseManifest:
        return replace(m, signature=key.sign(m.digest()))

    held = signed(manifest(seq=3))
    with pytest.raises(ProtocolError) as e:
        check_release(manifest(seq=4), key.verify_key, "f1", held)
    assert e.value.reason == "unsigned_release"
    with pytest.raises(ProtocolError) as e:
        check_release(signed(manifest(seq=2)), key.verify_key, "f1", held)
    assert e.value.reason == "stale_release"
    with pytest.raises(ProtocolError) as e:  # same seq, other content: a replay or a forgery
        check_release(signed(manifest(seq=3, version=9)), key.verify_key, "f1", held)
    assert e.value.reason == "stale_release"
    with pytest.raises(ProtocolError) as e:
        check_release(signed(manifest(seq=5, fleet="other")), key.verify_key, "f1", held)
    assert e.value.reason == "wrong_fleet"
    assert check_release(held, key.verify_key, "f1", held) is None  # re-delivered: nothing
    rollback = signed(manifest(seq=4, version=5, sha256=SHA_B, previous=None, previous_sha256=""))
    assert check_release(rollback, key.verify_key, "f1", held) == rollback  # older version ok


def test_manifest_refuses_inconsistent_fields() -> None:
    with pytest.raises(InvalidValue):
        manifest(cohort=cohort_bound(0.25))  # not the stage's bound
    with pytest.raises(InvalidValue):
        manifest(stages=(0.5, 0.25, 1.0))
    raw = manifest().to_bytes().replace(b"canary", b"sneaky")
    with pytest.raises(ProtocolError):
        ReleaseManifest.from_bytes(raw)


def test_status_carries_serving_and_shadow_report_within_the_status_limit() -> None:
    from fedge.limits import MAX_STATUS_BYTES

    report = ShadowReport(
        seq=3, version=7, samples=40, accuracy=0.9, loss=0.3, latency_ms=0.05,
        baseline=5, base_accuracy=0.95, base_loss=0.2, base_latency_ms=0.04,
        error="x" * 500, switched=False,
    )  # fmt: skip
    st = DeviceStatus("dev-1", DeviceState.ONLINE, 9, 1.0, serving=5, shadow=report)
    raw = st.to_bytes()
    assert len(raw) < MAX_STATUS_BYTES
    back = DeviceStatus.from_bytes(raw)
    assert back.serving == 5
    assert back.shadow is not None
    assert back.shadow.regression_pp == pytest.approx(5.0)
    assert back.shadow.error == "x" * 120
    plain = DeviceStatus("dev-1", DeviceState.ONLINE, 9, 1.0)
    assert DeviceStatus.from_bytes(plain.to_bytes()) == plain
