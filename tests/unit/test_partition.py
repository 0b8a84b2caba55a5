from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulation.partition import (
    PartitionSpec,
    partition,
    partition_dirichlet,
    partition_iid,
    partition_shards,
)

SPECS = ["iid", "dirichlet:0.5", "dirichlet:100", "shards:1", "shards:2"]


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    assert all(p.dtype == np.int64 and p.ndim == 1 for p in parts)
    joined = np.concatenate(parts)
    assert len(joined) == n, "parts overlap or miss samples"
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))


def mean_label_entropy(y: np.ndarray, parts: list[np.ndarray]) -> float:
    entropies = []
    for part in parts:
        counts = np.bincount(y[part])
        p = counts[counts > 0] / counts.sum()
        entropies.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(entropies))


@pytest.fixture
def labels() -> np.ndarray:
    return np.repeat(np.arange(10), 100)


# --- PartitionSpec ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("iid", PartitionSpec("iid")),
        (" IID ", PartitionSpec("iid")),
        ("dirichlet:0.5", PartitionSpec("dirichlet", alpha=0.5)),
        ("dirichlet:1", PartitionSpec("dirichlet", alpha=1.0)),
        ("shards:2", PartitionSpec("shards", shards=2)),
    ],
)
def test_parse(text: str, expected: PartitionSpec) -> None:
    assert PartitionSpec.parse(text) == expected


@pytest.mark.parametrize(
    "text", ["iid", "dirichlet:0.5", "dirichlet:1", "dirichlet:1e-05", "shards:3"]
)
def test_str_is_canonical_and_round_trips(text: str) -> None:
    spec = PartitionSpec.parse(text)
    assert str(spec) == text
    assert PartitionSpec.parse(str(spec)) == spec


@pytest.mark.parametrize(
    "text",
    [
        "",
        "iid:1",
        "dirichlet",
        "dirichlet:",
        "dirichlet:x",
        "dirichlet:0",
        "dirichlet:-1",
        "dirichlet:nan",
        "dirichlet:inf",
        "shards",
        "shards:0",
        "shards:1.5",
        "label_skew:0.5",
    ],
)
def test_parse_rejects_with_a_hint(text: str) -> None:
    with pytest.raises(
        ValueError, match=r"expected iid, dirichlet:ALPHA \(ALPHA > 0\) or shards:K"
    ):
        PartitionSpec.parse(text)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "iid", "alpha": 0.5},
        {"kind": "dirichlet"},
        {"kind": "dirichlet", "alpha": 0.0},
        {"kind": "dirichlet", "alpha": 1.0, "shards": 2},
        {"kind": "shards"},
        {"kind": "shards", "shards": True},
        {"kind": "shards", "shards": 2, "alpha": 1.0},
        {"kind": "zipf"},
    ],
)
def test_constructor_validates(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="invalid partition"):
        PartitionSpec(**kwargs)


# --- invariants --------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS)
def test_parts_are_disjoint_and_cover(labels: np.ndarray, spec: str) -> None:
    parts = partition(labels, 10, spec, seed=3)

    assert len(parts) == 10
    assert_exact_cover(parts, len(labels))


@pytest.mark.parametrize("spec", SPECS)
def test_deterministic_for_a_seed(labels: np.ndarray, spec: str) -> None:
    first = partition(labels, 7, spec, seed=11)
    again = partition(labels, 7, PartitionSpec.parse(spec), seed=11)
    other = partition(labels, 7, spec, seed=12)

    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("num_devices", [0, -1, 1001])
def test_rejects_bad_device_counts(labels: np.ndarray, spec: str, num_devices: int) -> None:
    with pytest.raises(ValueError, match="num_devices must be between 1 and"):
        partition(labels, num_devices, spec, seed=0)


def test_rejects_non_integer_labels() -> None:
    with pytest.raises(ValueError, match="labels must be integers"):
        partition(np.array([0.0, 1.0, 1.0]), 2, "iid", seed=0)


def test_one_device_gets_everything(labels: np.ndarray) -> None:
    for spec in SPECS:
        (only,) = partition(labels, 1, spec, seed=0)
        np.testing.assert_array_equal(only, np.arange(len(labels)))


def test_iid_sizes_differ_by_at_most_one() -> None:
    y = np.zeros(103, dtype=np.int64)

    sizes = [len(p) for p in partition_iid(y, 10, np.random.default_rng(0))]

    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == 103


def test_dirichlet_respects_min_size(labels: np.ndarray) -> None:
    parts = partition_dirichlet(labels, 20, 0.1, np.random.default_rng(0), min_size=10)

    assert min(len(p) for p in parts) >= 10
    assert_exact_cover(parts, len(labels))


def test_dirichlet_gives_up_with_a_clear_error() -> None:
    y = np.repeat(np.arange(2), 10)

    with pytest.raises(ValueError, match="use a larger alpha, fewer devices or a smaller min_size"):
        partition_dirichlet(y, 10, 0.01, np.random.default_rng(0), min_size=2, max_attempts=5)


def test_dirichlet_rejects_impossible_min_size(labels: np.ndarray) -> None:
    with pytest.raises(ValueError, match="cannot hold"):
        partition_dirichlet(labels, 10, 1.0, np.random.default_rng(0), min_size=101)


def test_label_skew_grows_as_alpha_shrinks(labels: np.ndarray) -> None:
    skewed = mean_label_entropy(labels, partition(labels, 10, "dirichlet:0.1", seed=0))
    mild = mean_label_entropy(labels, partition(labels, 10, "dirichlet:1", seed=0))
    near_iid = mean_label_entropy(labels, partition(labels, 10, "dirichlet:100", seed=0))

    assert skewed < mild < near_iid
    assert near_iid > 0.95 * np.log(10)


@pytest.mark.parametrize("shards_per_device", [1, 2, 3])
def test_shards_limit_labels_per_device(shards_per_device: int) -> None:
    # 10 classes x 60 samples; 10 devices x k shards divide every class evenly.
    y = np.repeat(np.arange(10), 60)

    parts = partition_shards(y, 10, shards_per_device, np.random.default_rng(5))

    assert_exact_cover(parts, len(y))
    assert all(len(np.unique(y[p])) <= shards_per_device for p in parts)
    assert {len(p) for p in parts} == {60}


def test_shards_reject_more_shards_than_samples() -> None:
    with pytest.raises(ValueError, match="use fewer devices or shards"):
        partition_shards(np.arange(5), 3, 2, np.random.default_rng(0))


# --- property tests ----------------------------------------------------------


@st.composite
def label_arrays(draw: st.DrawFn) -> np.ndarray:
    n = draw(st.integers(min_value=1, max_value=60))
    classes = draw(st.integers(min_value=1, max_value=6))
    values = draw(st.lists(st.integers(0, classes - 1), min_size=n, max_size=n))
    return np.array(values, dtype=np.int64)


@settings(max_examples=150, deadline=None)
@given(y=label_arrays(), data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_iid_and_shards_always_cover(y: np.ndarray, data: st.DataObject, seed: int) -> None:
    num_devices = data.draw(st.integers(1, len(y)))
    shards = data.draw(st.integers(1, max(1, len(y) // num_devices)))

    for spec in ("iid", f"shards:{shards}"):
        parts = partition(y, num_devices, spec, seed)
        assert len(parts) == num_devices
        assert_exact_cover(parts, len(y))
        assert all(len(p) >= 1 for p in parts)
        again = partition(y, num_devices, spec, seed)
        assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


@settings(max_examples=150, deadline=None)
@given(
    y=label_arrays(),
    data=st.data(),
    alpha=st.sampled_from([0.3, 1.0, 10.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_dirichlet_covers_or_refuses_clearly(
    y: np.ndarray, data: st.DataObject, alpha: float, seed: int
) -> None:
    num_devices = data.draw(st.integers(1, max(1, len(y) // 5)))
    min_size = data.draw(st.integers(0, min(2, len(y) // num_devices)))
    rng = np.random.default_rng(seed)

    try:
        parts = partition_dirichlet(y, num_devices, alpha, rng, min_size=min_size)
    except ValueError as exc:
        refusal = str(exc)
    else:
        refusal = ""
    if refusal:
        # Only a legitimately unlucky draw may fail, and it must say so.
        assert "attempts" in refusal
        return
    assert len(parts) == num_devices
    assert_exact_cover(parts, len(y))
    assert min(len(p) for p in parts) >= min_size
