from __future__ import annotations

import json
import os
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from aggregator.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from aggregator.registry import ModelRegistry
from fedge.support.fsutil import atomic_write


def make_checkpoint(seed: int = 0, version: int = 3) -> Checkpoint:
    rng = np.random.default_rng(seed)
    return Checkpoint(
        version=version,
        last_round=version + 2,
        weights={
            "fc1.weight": rng.standard_normal((8, 5)).astype(np.float32),
            "fc1.bias": rng.standard_normal(8).astype(np.float32),
            "fc2.weight": np.array(
                [[np.finfo(np.float32).max, np.finfo(np.float32).tiny]], np.float32
            ),
            "empty": np.zeros((0, 4), np.float32),
        },
        counted=("dev-a", "dev-b"),
        failed_rounds=1,
    )


def assert_same_checkpoint(got: Checkpoint | None, want: Checkpoint) -> None:
    assert got is not None
    assert (got.version, got.last_round, got.counted, got.failed_rounds) == (
        want.version,
        want.last_round,
        want.counted,
        want.failed_rounds,
    )
    assert list(got.weights) == list(want.weights)
    for k, w in want.weights.items():
        assert got.weights[k].dtype == np.float32
        assert got.weights[k].shape == w.shape
        assert got.weights[k].tobytes() == w.tobytes()  # bit-exact, -0.0 and subnormals included


def dir_listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


# --- checkpoint ------------------------------------------------------------------


def test_checkpoint_round_trip_is_bit_exact(tmp_path: Path) -> None:
    ckpt = make_checkpoint()
    path = tmp_path / "state.ckpt"

    save_checkpoint(path, ckpt)

    assert_same_checkpoint(load_checkpoint(path), ckpt)
    assert dir_listing(tmp_path) == ["state.ckpt"]


weight_maps = st.dictionaries(
    st.from_regex(r"\A[a-z][a-z0-9.]{0,12}\Z"),
    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4).flatmap(
        lambda s: hnp.arrays(
            np.float32, s, elements=st.floats(width=32, allow_nan=False, allow_infinity=False)
        )
    ),
    max_size=4,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    weights=weight_maps,
    version=st.integers(0, 2**31),
    counted=st.lists(st.text(max_size=10), max_size=5).map(tuple),
)
def test_checkpoint_round_trip_property(
    tmp_path: Path, weights: dict[str, np.ndarray], version: int, counted: tuple[str, ...]
) -> None:
    ckpt = Checkpoint(version=version, last_round=version, weights=weights, counted=counted)
    path = tmp_path / "prop.ckpt"

    save_checkpoint(path, ckpt)

    assert_same_checkpoint(load_checkpoint(path), ckpt)


def test_checkpoint_stores_float64_weights_as_float32(tmp_path: Path) -> None:
    weights = {"w": np.array([0.1, 1.0 / 3.0], np.float64)}
    path = tmp_path / "c.ckpt"

    save_checkpoint(path, Checkpoint(version=1, last_round=1, weights=weights))
    loaded = load_checkpoint(path)

    assert loaded is not None
    np.testing.assert_array_equal(loaded.weights["w"], weights["w"].astype(np.float32))


def test_checkpoint_overwrite_keeps_the_newest(tmp_path: Path) -> None:
    path = tmp_path / "c.ckpt"
    save_checkpoint(path, make_checkpoint(seed=1, version=1))
    newer = make_checkpoint(seed=2, version=2)

    save_checkpoint(path, newer)

    assert_same_checkpoint(load_checkpoint(path), newer)


def test_missing_checkpoint_is_none(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path / "nothing.ckpt") is None


def test_checkpoint_without_failed_rounds_defaults_to_zero(tmp_path: Path) -> None:
    path = tmp_path / "c.ckpt"
    save_checkpoint(path, make_checkpoint())
    raw = msgpack.unpackb(path.read_bytes(), raw=False)
    del raw["failed_rounds"]
    path.write_bytes(msgpack.packb(raw, use_bin_type=True))

    loaded = load_checkpoint(path)

    assert loaded is not None
    assert loaded.failed_rounds == 0


def test_checkpoint_unknown_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.ckpt"
    save_checkpoint(path, make_checkpoint())
    raw = msgpack.unpackb(path.read_bytes(), raw=False)
    raw["format"] = 99
    path.write_bytes(msgpack.packb(raw, use_bin_type=True))

    with pytest.raises(ValueError, match="format 99"):
        load_checkpoint(path)


def test_failed_save_keeps_the_old_checkpoint_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.ckpt"
    old = make_checkpoint(seed=1, version=1)
    save_checkpoint(path, old)

    def crash(src: str, dst: str) -> None:
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(path, make_checkpoint(seed=2, version=2))
    monkeypatch.undo()

    assert_same_checkpoint(load_checkpoint(path), old)
    assert dir_listing(tmp_path) == ["c.ckpt"]


def test_checkpoint_with_scalar_weight_round_trips(tmp_path: Path) -> None:
    # Regression: a 0-d weight was saved as shape [1] and the checkpoint could not be loaded.
    ckpt = Checkpoint(version=1, last_round=1, weights={"temperature": np.array(2.0, np.float32)})
    path = tmp_path / "c.ckpt"

    save_checkpoint(path, ckpt)

    assert_same_checkpoint(load_checkpoint(path), ckpt)


# --- atomic_write ----------------------------------------------------------------


def test_atomic_write_creates_parents_and_writes(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "file.bin"

    atomic_write(path, b"\x00payload\xff")

    assert path.read_bytes() == b"\x00payload\xff"
    assert dir_listing(path.parent) == ["file.bin"]


def test_atomic_write_replaces_existing(tmp_path: Path) -> None:
    path = tmp_path / "file.bin"
    path.write_bytes(b"old contents, longer than the new ones")

    atomic_write(path, b"new")

    assert path.read_bytes() == b"new"


@pytest.mark.parametrize("fail_in", ["replace", "fsync"])
@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_atomic_write_failure_leaves_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_in: str, error: BaseException
) -> None:
    path = tmp_path / "file.bin"
    path.write_bytes(b"old")

    def fail(*args: object) -> None:
        raise error

    monkeypatch.setattr(os, fail_in, fail)
    with pytest.raises(type(error)):
        atomic_write(path, b"new")
    monkeypatch.undo()

    assert path.read_bytes() == b"old"
    assert dir_listing(tmp_path) == ["file.bin"]


# --- ModelRegistry -----------------------------------------------------------------


def test_registry_save_versions_meta(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "models")
    metas = {
        v: {"version": v, "accuracy": 0.5 + v / 100, "devices": ["a", "b"]} for v in (10, 1, 3)
    }

    paths = {v: reg.save(v, f"onnx-{v}".encode(), m) for v, m in metas.items()}

    assert reg.versions() == [1, 3, 10]
    assert paths[3] == tmp_path / "models" / "v000003.onnx"
    for v, m in metas.items():
        assert reg.path(v) == paths[v]
        assert paths[v].read_bytes() == f"onnx-{v}".encode()
        assert reg.meta(v) == m
    assert dir_listing(tmp_path / "models") == sorted(
        f"v{v:06d}.{ext}" for v in metas for ext in ("onnx", "json")
    )


def test_registry_empty_and_created(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "new" / "dir")

    assert (tmp_path / "new" / "dir").is_dir()
    assert reg.versions() == []


def test_registry_save_same_version_overwrites(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path)
    reg.save(2, b"first", {"n": 1})

    reg.save(2, b"second", {"n": 2})

    assert reg.versions() == [2]
    assert reg.path(2).read_bytes() == b"second"
    assert reg.meta(2) == {"n": 2}


def test_registry_meta_is_json(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path)

    reg.save(1, b"m", {"b": 2, "a": 1})

    assert json.loads((tmp_path / "v000001.json").read_text()) == {"a": 1, "b": 2}


def test_registry_meta_of_unknown_version(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path)

    with pytest.raises(FileNotFoundError):
        reg.meta(4)


def test_async_recent_rounds_keep_who_was_counted(tmp_path: Path) -> None:
    from dataclasses import replace

    ck = replace(
        make_checkpoint(),
        recent_tasks=(b"t4", b"t5"),
        recent_counted={4: {"dev-a": "u1"}, 5: {}},
    )
    save_checkpoint(tmp_path / "c", ck)
    got = load_checkpoint(tmp_path / "c")
    assert got is not None
    assert got.recent_counted == {4: {"dev-a": "u1"}, 5: {}}
    assert got.recent_tasks == (b"t4", b"t5")


def test_a_checkpoint_written_before_recent_counted_existed_still_loads(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "c", make_checkpoint())
    obj = msgpack.unpackb((tmp_path / "c").read_bytes())
    del obj["recent_counted"]
    (tmp_path / "c").write_bytes(msgpack.packb(obj))
    got = load_checkpoint(tmp_path / "c")
    assert got is not None
    assert got.recent_counted == {}


def test_registry_int8_twins_are_not_versions_and_go_with_theirs_when_pruned(
    tmp_path: Path,
) -> None:
    reg = ModelRegistry(tmp_path)
    for v in (1, 2, 3, 4):
        reg.save(v, b"m", {"v": v})
        reg.path(v).with_suffix(".int8.onnx").write_bytes(b"q")
    assert reg.versions() == [1, 2, 3, 4]

    assert reg.prune(2) == [1, 2]
    assert reg.versions() == [3, 4]
    assert dir_listing(tmp_path) == sorted(
        f"v{v:06d}.{ext}" for v in (3, 4) for ext in ("onnx", "json", "int8.onnx")
    )
    assert reg.prune(5) == []
    with pytest.raises(ValueError, match="keep"):
        reg.prune(0)
