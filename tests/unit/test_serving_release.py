"""What a release of a version serves (``ModelRegistry.release``): its pruned serving model when
it has one, checked against the sha256 its metadata records; else the trained model."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from aggregator.registry import ModelRegistry


def _save(reg: ModelRegistry, version: int, onnx: bytes) -> None:
    reg.save(version, onnx, {"version": version, "sha256": hashlib.sha256(onnx).hexdigest()})


def test_a_version_with_a_serving_model_releases_it_and_prune_removes_it(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path)
    _save(reg, 1, b"dense-1")
    _save(reg, 2, b"dense-2")
    assert reg.release(1)[:2] == (b"dense-1", hashlib.sha256(b"dense-1").hexdigest())

    reg.save_serving(2, b"small")
    onnx, sha, meta = reg.release(2)
    assert (onnx, sha) == (b"small", hashlib.sha256(b"small").hexdigest())
    assert (meta["serving_bytes"], meta["sha256"]) == (5, hashlib.sha256(b"dense-2").hexdigest())
    assert reg.load(2)[0] == b"dense-2"  # training and checkpoints still see the trained model
    assert reg.versions() == [1, 2]  # the serving file is no version of its own

    reg.path(2).with_suffix(".serving.onnx").write_bytes(b"tampered")
    with pytest.raises(KeyError, match="serving ONNX does not match"):
        reg.release(2)

    assert reg.prune(1) == [1]
    reg.save_serving(2, b"small")
    _save(reg, 3, b"dense-3")
    reg.prune(1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v000003.json", "v000003.onnx"]
