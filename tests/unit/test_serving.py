"""The device's side of a release without a broker (edge_agent/serving.py): what it serves,
when it evaluates, what it reports when a candidate cannot be verified or loaded."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edge_agent.serving import ReleaseFollower
from fedge.envelopes import GlobalModel, ModelArch, ReleaseManifest, ReleaseMode, cohort_bound
from fedge.errors import ProtocolError
from fedge.identity import SigningKey
from fedge.limits import DEFAULT_LIMITS
from fedge.topics import Topics

TOPICS = Topics("unit")
KEY = SigningKey.generate()
ARCH = ModelArch("mlp", 64, 10)


@pytest.fixture(scope="module")
def onnx_v() -> dict[int, bytes]:
    from models.onnx_export import OnnxTemplate
    from models.torch_state import to_numpy_state
    from models.zoo import build_model

    t = OnnxTemplate("mlp", 64, 10)
    return {v: t.render(to_numpy_state(build_model("mlp", 64, 10, seed=v))) for v in (1, 2)}


def model(version: int, onnx: bytes) -> bytes:
    g = GlobalModel(version, ARCH, onnx, hashlib.sha256(onnx).hexdigest(), 0.0)
    return replace(g, signature=KEY.sign(g.digest())).to_bytes()


def manifest(
    seq: int, version: int, onnx: bytes, prev: tuple[int, bytes] | None, **kw: object
) -> bytes:
    m = ReleaseManifest(
        "unit", seq, version, hashlib.sha256(onnx).hexdigest(),
        prev[0] if prev else None, hashlib.sha256(prev[1]).hexdigest() if prev else "",
        0, (1.0,), cohort_bound(1.0), ReleaseMode.CANARY, 1.0, 0.0,
    )  # fmt: skip
    m = replace(m, **kw)  # type: ignore[arg-type]
    return replace(m, signature=KEY.sign(m.digest())).to_bytes()


def follower(tmp_path: Path) -> tuple[ReleaseFollower, list[int]]:
    rng = np.random.default_rng(0)
    x, y = rng.random((20, 64), dtype=np.float32), rng.integers(0, 10, 20)
    changes: list[int] = []
    f = ReleaseFollower(
        "dev-1", TOPICS, tmp_path, (x, y), verify_key=KEY.verify_key, limits=DEFAULT_LIMITS,
        on_change=lambda: changes.append(1),
    )  # fmt: skip
    return f, changes


def test_a_candidate_waits_for_its_model_is_evaluated_then_served(
    tmp_path: Path, onnx_v: dict[int, bytes]
) -> None:
    f, changes = follower(tmp_path)
    f.offer(TOPICS.release, manifest(1, 1, onnx_v[1], None))
    assert f.serving is None  # its model has not come
    f.offer(TOPICS.release_candidate, model(1, onnx_v[1]))
    assert f.serving == 1
    assert f.report is not None
    assert (f.report.version, f.report.baseline, f.report.switched) == (1, None, True)
    f.offer(TOPICS.release_stable, model(1, onnx_v[1]))
    f.offer(TOPICS.release_candidate, model(2, onnx_v[2]))
    f.offer(TOPICS.release, manifest(2, 2, onnx_v[2], (1, onnx_v[1])))
    assert f.serving == 2
    assert f.report.baseline == 1  # scored against what it served
    # A restart keeps it all: serving, last known good, the held manifest.
    again, _ = follower(tmp_path)
    assert (again.serving, again.store.lkg.version) == (2, 1)  # type: ignore[union-attr]
    assert again.store.manifest is not None
    assert changes


def test_a_candidate_that_does_not_load_is_reported_and_not_served(
    tmp_path: Path, onnx_v: dict[int, bytes]
) -> None:
    f, _ = follower(tmp_path)
    f.offer(TOPICS.release_candidate, model(1, onnx_v[1]))
    f.offer(TOPICS.release, manifest(1, 1, onnx_v[1], None))
    junk = b"not an onnx file"
    f.offer(TOPICS.release_candidate, model(2, junk))
    f.offer(TOPICS.release, manifest(2, 2, junk, (1, onnx_v[1])))
    assert f.serving == 1
    assert f.report is not None
    assert f.report.version == 2
    assert f.report.error.startswith("load:")


def test_a_forged_or_mismatched_candidate_is_reported_as_a_verify_failure(
    tmp_path: Path, onnx_v: dict[int, bytes]
) -> None:
    f, _ = follower(tmp_path)
    f.offer(TOPICS.release, manifest(1, 2, onnx_v[2], None))
    forged = GlobalModel(2, ARCH, onnx_v[2], hashlib.sha256(onnx_v[2]).hexdigest(), 0.0)
    with pytest.raises(ProtocolError):
        f.offer(TOPICS.release_candidate, forged.to_bytes())  # unsigned
    assert f.report is not None
    assert f.report.error == "bad_signature"
    assert f.serving is None
    g, _ = follower(tmp_path / "other")
    g.offer(TOPICS.release, manifest(1, 2, onnx_v[2], None))
    g.offer(TOPICS.release_candidate, model(2, onnx_v[1]))  # genuine model, other bytes
    assert g.report is not None
    assert "sha256" in g.report.error
    assert g.serving is None


def test_direct_rollback_to_the_last_known_good_keeps_it_known_good(
    tmp_path: Path, onnx_v: dict[int, bytes]
) -> None:
    f, _ = follower(tmp_path)
    f.offer(TOPICS.release_candidate, model(1, onnx_v[1]))
    f.offer(TOPICS.release, manifest(1, 1, onnx_v[1], None))
    f.offer(TOPICS.release_candidate, model(2, onnx_v[2]))
    f.offer(TOPICS.release, manifest(2, 2, onnx_v[2], (1, onnx_v[1])))
    assert f.serving == 2
    # The rollback's manifest names v1, which the device has on disk: no model needed.
    f.offer(TOPICS.release, manifest(3, 1, onnx_v[1], None, mode=ReleaseMode.DIRECT))
    assert f.serving == 1
    assert f.store.lkg.version == 1  # type: ignore[union-attr]
    with pytest.raises(ProtocolError):  # the older manifest again: stale
        f.offer(TOPICS.release, manifest(2, 2, onnx_v[2], (1, onnx_v[1])))
    assert f.serving == 1


def test_the_shadow_evaluation_line_names_the_baseline_or_its_absence(
    tmp_path: Path, onnx_v: dict[int, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    # The first release read "(serving None: 0.0000)" as if None had scored 0.
    f, _ = follower(tmp_path)
    with caplog.at_level("INFO", logger="edge_agent.serving"):
        f.offer(TOPICS.release_candidate, model(1, onnx_v[1]))
        f.offer(TOPICS.release, manifest(1, 1, onnx_v[1], None))
        f.offer(TOPICS.release_stable, model(1, onnx_v[1]))
        f.offer(TOPICS.release_candidate, model(2, onnx_v[2]))
        f.offer(TOPICS.release, manifest(2, 2, onnx_v[2], (1, onnx_v[1])))
    lines = [r.getMessage() for r in caplog.records if "shadow evaluation" in r.getMessage()]
    assert len(lines) == 2, lines
    assert "(nothing served yet)" in lines[0]
    assert "None" not in lines[0]
    assert f"(serving v1: {f.report.base_accuracy:.4f})" in lines[1]  # type: ignore[union-attr]
