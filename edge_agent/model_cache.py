"""Sharing one copy of a model version among agents in the same process.

On a device there is one agent and the cache holds one entry. In a simulation, hundreds of
agents receive the same version: without sharing, each keeps its own ONNX bytes and weight
arrays (measured: ~240 KB per simulated device with the digits MLP, which broke the "1,000
devices within 1.5x of 10" memory bar). Entries are weak, so a version no agent holds is freed.
Agents never write into the shared arrays (training copies them into torch; deltas are new
arrays).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import numpy as np

__all__ = ["ModelCache"]


class _Entry:
    __slots__ = ("__weakref__", "onnx", "weights")

    def __init__(self, onnx: bytes, weights: dict[str, np.ndarray]) -> None:
        self.onnx = onnx
        self.weights = weights


class ModelCache:
    def __init__(self) -> None:
        self._entries: weakref.WeakValueDictionary[str, _Entry] = weakref.WeakValueDictionary()
        # The same, by the weights' hash (fedge.patches): agents that applied the same patch.
        self._patched: weakref.WeakValueDictionary[bytes, _Entry] = weakref.WeakValueDictionary()

    def get(
        self, sha256: str, onnx: bytes, parse: Callable[[bytes], dict[str, np.ndarray]]
    ) -> _Entry:
        entry = self._entries.get(sha256)
        if entry is None:
            entry = _Entry(onnx, parse(onnx))
            self._entries[sha256] = entry
        return entry

    def patched(
        self, weights_sha256: bytes, make: Callable[[], tuple[bytes, dict[str, np.ndarray]]]
    ) -> _Entry:
        """The entry for weights reached by a patch (``make``: their ONNX and arrays)."""
        entry = self._patched.get(weights_sha256)
        if entry is None:
            onnx, weights = make()
            entry = _Entry(onnx, weights)
            self._patched[weights_sha256] = entry
        return entry
