"""Error feedback: what a lossy codec did not send is kept and added to the next delta.

With top-k or quantized deltas, a device sends ``sent = decode(encode(target))`` instead of
``target``. Dropping the difference loses it for good, and a coordinate whose update is
always below the top-k threshold would never move. Error feedback keeps
``residual = target - sent`` and sends ``target = delta + residual`` next time, so over any
number of rounds ``sum(sent) + residual == sum(delta)``: nothing is lost, only delayed.

The residual lives in the agent's state directory (``residual.npz``, written atomically
*before* the update is published), so a reboot keeps it. It is dropped when the model's
tensor set or shapes change: a residual of another architecture means nothing.
"""

from __future__ import annotations

import io
import logging
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedge.support.fsutil import atomic_write
from fedge.tensors import TensorSpec, spec_of

__all__ = ["RESIDUAL_FILE", "Residual"]

log = logging.getLogger(__name__)

RESIDUAL_FILE = "residual.npz"


class Residual:
    """Per-tensor float32 residuals of one device (empty until a lossy round)."""

    def __init__(self, tensors: Mapping[str, np.ndarray] | None = None) -> None:
        self._r: dict[str, np.ndarray] = {
            k: np.array(v, dtype=np.float32) for k, v in (tensors or {}).items()
        }

    def __bool__(self) -> bool:
        return bool(self._r)

    @property
    def tensors(self) -> dict[str, np.ndarray]:
        """A copy of the residuals, ``{name: float32 array}``."""
        return {k: v.copy() for k, v in self._r.items()}

    @property
    def spec(self) -> dict[str, tuple[int, ...]]:
        return spec_of(self._r)

    def copy(self) -> Residual:
        """An independent copy (the pure upload step works on one)."""
        return Residual(self._r)

    def reset(self) -> None:
        self._r = {}

    def apply(self, delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``delta + residual`` as float32 (a new dict); resets a residual of another spec."""
        d = {k: np.asarray(v, dtype=np.float32) for k, v in delta.items()}
        if self._r and spec_of(d) != self.spec:
            log.info("model tensors changed: error-feedback residual dropped")
            self._r = {}
        if not self._r:
            return {k: v.copy() for k, v in d.items()}
        return {k: v + self._r[k] for k, v in d.items()}

    def update(self, target: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray]) -> None:
        """Keep ``target - sent``: what the receiver will not see of ``target``."""
        if spec_of(target) != spec_of(sent):
            raise ValueError("target and sent must have the same tensor names and shapes")
        self._r = {
            k: np.asarray(t, dtype=np.float32) - np.asarray(sent[k], dtype=np.float32)
            for k, t in target.items()
        }

    # -- persistence ----------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Write ``directory/residual.npz`` atomically (an empty residual writes an empty file)."""
        buf = io.BytesIO()
        # Positional keys, names stored apart: tensor names are not safe npz member names.
        arrays: dict[str, Any] = {f"t{i}": v for i, v in enumerate(self._r.values())}
        arrays["names"] = np.array(list(self._r), dtype=np.str_)
        np.savez(buf, **arrays)
        atomic_write(Path(directory) / RESIDUAL_FILE, buf.getvalue())

    @classmethod
    def load(cls, directory: Path, spec: TensorSpec | None = None) -> Residual:
        """The saved residual; empty when there is none, it is unreadable, or ``spec`` differs."""
        path = Path(directory) / RESIDUAL_FILE
        try:
            # Read the bytes first: np.load leaks its file handle when the file is corrupt.
            with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as z:
                names = [str(n) for n in z["names"]]
                tensors = {n: z[f"t{i}"] for i, n in enumerate(names)}
        except FileNotFoundError:
            return cls()
        except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
            log.warning("%s unreadable, starting without a residual: %s", path, e)
            return cls()
        if not all(v.dtype == np.float32 for v in tensors.values()):
            log.warning("%s holds non-float32 tensors, starting without a residual", path)
            return cls()
        if spec is not None and spec_of(tensors) != {k: tuple(s) for k, s in spec.items()}:
            log.info("%s is for other model tensors, starting without a residual", path)
            return cls()
        return cls(tensors)
