"""A device's local training data, from an .npz file (arrays ``x`` float, ``y`` int)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from fedge.errors import ConfigError

__all__ = ["LocalData", "load_local_data"]


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


def _pick(directory: Path, device_id: str) -> Path:
    files = sorted(directory.glob("device-*.npz"))
    if not files:
        raise ConfigError(f"no device-*.npz files in {directory}")
    h = int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:8], "big")
    return files[h % len(files)]


def load_local_data(path: Path, device_id: str) -> LocalData:
    path = Path(path)
    if path.is_dir():
        path = _pick(path, device_id)
    if not path.exists():
        raise ConfigError(f"data file {path} not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            return LocalData(z["x"], z["y"])
    except (KeyError, ValueError, OSError) as e:
        raise ConfigError(
            f"{path}: not usable training data ({e}); expected arrays x and y"
        ) from None
