"""Convert between a torch module's state_dict and plain numpy arrays.

Aggregation, the wire codecs and the ONNX patcher all work on
`dict[str, np.ndarray]` so that none of them needs torch. This module is the one
crossing point, and it is strict: a silently skipped or broadcast key would
corrupt a global model for the whole fleet.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

__all__ = ["load_numpy_state", "to_numpy_state"]


def to_numpy_state(module: nn.Module) -> dict[str, np.ndarray]:
    """Return float32, C-contiguous copies of the state_dict, in state_dict order.

    Copies, not views: the caller may hand the arrays to another thread or keep
    them across optimizer steps that update the tensors in place.
    Non-floating entries (e.g. BatchNorm's `num_batches_tracked`) are refused
    rather than cast, because averaging integer counters as floats is wrong.
    """
    state: dict[str, np.ndarray] = {}
    for key, tensor in module.state_dict().items():
        if not tensor.is_floating_point():
            raise ValueError(
                f"state entry {key!r} has dtype {tensor.dtype}; only floating tensors "
                "can be exchanged as float32 weights"
            )
        array = tensor.detach().to(device="cpu", dtype=torch.float32).numpy()
        state[key] = np.array(array, dtype=np.float32, order="C", copy=True)
    return state


def load_numpy_state(module: nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Load `state` into `module` in place; keys and shapes must match exactly."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"state keys do not match the model: missing {missing}, unexpected {unexpected}"
        )
    tensors: dict[str, torch.Tensor] = {}
    for key, target in expected.items():
        array = np.asarray(state[key])
        if tuple(array.shape) != tuple(target.shape):
            raise ValueError(
                f"shape mismatch for {key!r}: model has {tuple(target.shape)}, "
                f"state has {tuple(array.shape)}"
            )
        if array.dtype.kind != "f":
            raise ValueError(f"state entry {key!r} has dtype {array.dtype}; expected a float array")
        tensors[key] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    # load_state_dict copies into the existing parameters (casting to their dtype),
    # so the caller's arrays are never aliased by the module.
    module.load_state_dict(tensors, strict=True)
