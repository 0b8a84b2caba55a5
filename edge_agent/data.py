"""A device's local training data, from an .npz file (arrays ``x`` float, ``y`` int).

``data:`` may also be a directory written by ``fedge data split``. The device then takes the
file its id maps to in the directory's ``meta.json`` (``devices``, from ``--device-ids``); a
split without that mapping is shared first come, first served: the device claims the first
file nobody claimed, by creating ``claims/<file>`` (exclusive create) holding its id, and takes
the same file again after a restart. Two devices never get one file, and which file a device
took is logged.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from fedge.errors import ConfigError

__all__ = ["CLAIMS_DIR", "LocalData", "load_local_data", "pick_file"]

CLAIMS_DIR = "claims"
log = logging.getLogger(__name__)


class LocalData:
    """Validated local samples: x float32 [n, d], y int64 [n]."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32)
        y = np.asarray(y, dtype=np.int64)
        if x.ndim != 2 or y.ndim != 1 or len(x) != len(y) or len(y) == 0:
            raise ValueError(
                f"local data must be x[n, d] and y[n] with n > 0; got {x.shape}, {y.shape}"
            )
        if not np.isfinite(x).all():
            raise ValueError("local data x contains NaN or Inf")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    @property
    def features(self) -> int:
        return int(self.x.shape[1])

    def width_problem(self, input_dim: int) -> str | None:
        """Why a model taking ``input_dim`` features cannot train on this data, or None."""
        if self.features == input_dim:
            return None
        return f"data has {self.features} features, the model expects {input_dim}"


def pick_file(directory: Path, device_id: str) -> tuple[Path, str]:
    """(the file of ``device_id`` in a split directory, how it was chosen)."""
    files = sorted(directory.glob("device-*.npz"))
    if not files:
        raise ConfigError(f"no device-*.npz files in {directory}")
    meta_path = directory / "meta.json"
    try:
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    except (OSError, ValueError) as e:
        raise ConfigError(f"{meta_path}: unreadable ({e})") from None
    mapping = meta.get("devices") if isinstance(meta, dict) else None
    if isinstance(mapping, dict):
        name = mapping.get(device_id)
        if not isinstance(name, str):
            raise ConfigError(
                f"device {device_id} is not in {meta_path} (devices {', '.join(sorted(mapping))}); "
                "split with its id in --device-ids, or point data: at one file"
            )
        return directory / Path(name).name, f"mapped in {meta_path.name}"
    return _claim(directory, files, device_id)


def _claim(directory: Path, files: list[Path], device_id: str) -> tuple[Path, str]:
    claims = directory / CLAIMS_DIR
    try:
        claims.mkdir(exist_ok=True)
        for f in files:  # the file this device claimed before a restart
            c = claims / f.name
            if c.is_file() and c.read_text().strip() == device_id:
                return f, f"claimed before ({c})"
        for f in files:
            try:
                fd = os.open(claims / f.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue  # another device's
            with os.fdopen(fd, "w") as out:
                out.write(device_id + "\n")
            return f, f"claimed ({claims / f.name})"
    except OSError as e:
        raise ConfigError(
            f"cannot claim a file in {directory} ({e.strerror}); split with --device-ids, "
            "or point data: at one file"
        ) from None
    raise ConfigError(
        f"all {len(files)} device-*.npz files in {directory} are claimed by other devices "
        f"({claims}); split for more devices"
    )


def load_local_data(path: Path, device_id: str) -> LocalData:
    path = Path(path)
    if path.is_dir():
        path, how = pick_file(path, device_id)
        log.info("%s: data %s (%s)", device_id, path, how)
    if not path.exists():
        raise ConfigError(f"data file {path} not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            return LocalData(z["x"], z["y"])
    except (KeyError, ValueError, OSError) as e:
        raise ConfigError(
            f"{path}: not usable training data ({e}); expected arrays x and y"
        ) from None
