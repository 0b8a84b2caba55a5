"""Model architectures and their two wire forms: numpy state dicts and ONNX files.

This package deliberately re-exports nothing: `import models` must stay free of
torch, because devices that only run inference ship onnxruntime and numpy and
nothing else. Import the submodule you need:

- `models.zoo`, `models.torch_state`, `models.onnx_export` import torch (trainers
  and the aggregator).
- `models.onnx_weights` imports onnx and numpy only (safe on inference devices).
"""

__all__ = [
    "int8",
    "onnx_export",
    "onnx_weights",
    "qat",
    "shrink",
    "torch_state",
    "units",
    "zoo",
]
