"""Quantization-aware training: fake int8 quantization with a straight-through estimator.

`enable_qat(model)` makes a built zoo model compute its forward pass the way the int8 ONNX
model that `models.int8.quantize_int8` makes from it will: every `nn.Linear` sees its weight
rounded per output channel to symmetric int8 and its input rounded per tensor to affine
uint8, and the model's output (the logits) is rounded too. Rounding has no useful gradient,
so the backward pass is the straight-through estimator: gradient 1 inside the quantization
range, 0 where a value was clipped.

Why not `torch.ao.quantization`: it is deprecated and its fake-quant modules do not export to
ONNX. Why not parametrizations: they rename parameters (`fc1.parametrizations.weight.original`)
and fedge needs `state_dict` keys to equal the ONNX initializer names and the shapes of the
deltas a device sends. So this module changes no parameter, buffer or key: it swaps the
`forward` of each `nn.Linear` instance and of the root module, and `disable_qat` undoes
that. The weights stay plain float32 tensors: what a device exports, averages and sends is the
latent float model, and the rounding is left to the int8 export.

The quantization grid mirrors onnxruntime's static quantizer (QDQ, per-channel weights):
- weights: scale = max|w_row| / 64, zero point 0, values in [-64, 64] (7 bits: onnxruntime's
  `reduce_range`, which `models.int8` sets so that x86 kernels without VNNI cannot saturate);
- activations: the observed range widened to include 0, scale = (max - min) / 255,
  zero point = round(-min / scale). int8 activations use the same grid shifted by 128, so the
  fake quantization is the same for both activation types.

Activation ranges are running min/max observers, reset by `enable_qat`: in training mode
each batch widens them (before that batch is quantized, so a fresh observer never clips);
in eval mode they are frozen once set. That is also what a device's calibration measures
(min and max over its data), so the training-time grid matches the published one.
Other layer types (convolutions, ...) are left in float; the zoo has none today.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MethodType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ACT_QMAX",
    "ACT_QMIN",
    "WEIGHT_QMAX",
    "RangeObserver",
    "activation_qparams",
    "disable_qat",
    "enable_qat",
    "fake_quantize_activation",
    "fake_quantize_weight",
    "is_qat_enabled",
]

# Symmetric int8 weights on [-64, 64]: what onnxruntime's quantizer makes with reduce_range=True,
# which models.int8 sets (with [-127, 127] the u8 x s8 kernels of x86 CPUs without VNNI
# saturate, and the int8 model stops computing what it was trained to; see models.int8).
WEIGHT_QMAX = 64
ACT_QMIN, ACT_QMAX = 0, 255

# Below this scale onnxruntime gives up on the range (scale 1, zero point 0); so do we.
_TINY = float(torch.finfo(torch.float32).tiny)

_LINEAR_ATTR = "_fedge_qat_input"
_ROOT_ATTR = "_fedge_qat_output"


@dataclass
class RangeObserver:
    """Running min/max of one activation tensor (Python floats: no tensor, no state_dict)."""

    low: float | None = None
    high: float | None = None

    def observe(self, x: torch.Tensor, training: bool) -> tuple[float, float]:
        """Widen the range with `x` when training (or when still empty); return the range."""
        if training or self.low is None or self.high is None:
            batch_low, batch_high = (float(v) for v in torch.aminmax(x.detach()))
            if self.low is None or self.high is None:
                self.low, self.high = batch_low, batch_high
            else:
                self.low, self.high = min(self.low, batch_low), max(self.high, batch_high)
        return self.low, self.high


@dataclass
class _QatState:
    """What QAT adds to a module: the observer of its input (Linear) or output (root)."""

    observer: RangeObserver = field(default_factory=RangeObserver)
    linears: tuple[nn.Linear, ...] = ()  # on the root only: what `disable_qat` restores


def activation_qparams(low: float, high: float) -> tuple[float, int]:
    """(scale, zero point) of the uint8 affine grid for the range [low, high].

    Same arithmetic as onnxruntime's `compute_scale_zp` (float64, then the scale as float32).
    """
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise ValueError(f"activation range must be finite with low <= high, got [{low}, {high}]")
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / (ACT_QMAX - ACT_QMIN)
    if scale < _TINY:
        return 1.0, 0
    zero_point = round(ACT_QMIN - low / scale)  # Python rounds half to even, like numpy
    return float(np.float32(scale)), int(zero_point)


def fake_quantize_activation(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Quantize-dequantize `x` on the uint8 grid of [low, high]; gradient 1 inside, 0 clipped."""
    scale, zero_point = activation_qparams(low, high)
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, ACT_QMIN, ACT_QMAX)


def fake_quantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize a weight per output channel (dim 0) on symmetric int8 [-64, 64].

    The scale of a channel is its max |w| / WEIGHT_QMAX, so no weight is ever clipped and the
    straight-through gradient is exactly 1 everywhere. Scales come from the detached weight.
    """
    flat = weight.detach().reshape(weight.shape[0], -1)
    absmax = flat.abs().amax(dim=1).to(torch.float64)
    scale = (2.0 * absmax / (2 * WEIGHT_QMAX)).to(weight.dtype)
    scale = torch.where(scale < _TINY, torch.ones_like(scale), scale)
    return _WeightFakeQuant.apply(weight, scale.reshape(-1, *([1] * (weight.dim() - 1))))


class _WeightFakeQuant(torch.autograd.Function):
    """round(w / s) * s with an identity gradient.

    Plain ops rather than torch.fake_quantize_per_channel_affine: that one keeps a clip mask
    for its backward and made a 512-wide MLP's training step ~5x slower; weights are never
    clipped here, so the mask is useless. Division (not multiplication by 1/s) as onnxruntime
    quantizes weights.
    """

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(weight / scale), -WEIGHT_QMAX, WEIGHT_QMAX) * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


# Module-level functions bound with MethodType (not closures): copy.deepcopy and pickle then
# carry the QAT forward over to the copy, bound to the copy's own weights and observers.
def _qat_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    state: _QatState = getattr(self, _LINEAR_ATTR)
    low, high = state.observer.observe(x, self.training)
    xq = fake_quantize_activation(x, low, high)
    return F.linear(xq, fake_quantize_weight(self.weight), self.bias)


def _qat_root_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    if isinstance(self, nn.Linear):  # a bare Linear is its own root
        output = _qat_linear_forward(self, *args, **kwargs)
    else:
        output = type(self).forward(self, *args, **kwargs)
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"QAT expects a model returning one tensor, got {type(output)}")
    state: _QatState = getattr(self, _ROOT_ATTR)
    low, high = state.observer.observe(output, self.training)
    return fake_quantize_activation(output, low, high)


def enable_qat(model: nn.Module) -> nn.Module:
    """Fake-quantize `model` in place (and return it); no-op if it is already enabled.

    Observers start empty. The state_dict (keys, shapes, dtypes, values) is unchanged.
    """
    if is_qat_enabled(model):
        return model
    linears = tuple(m for m in model.modules() if isinstance(m, nn.Linear))
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to quantize")
    for linear in linears:
        setattr(linear, _LINEAR_ATTR, _QatState())
        # An instance attribute shadows the class method, leaves hooks working and holds no
        # tensor that state_dict() could see.
        linear.forward = MethodType(_qat_linear_forward, linear)  # type: ignore[method-assign]
    setattr(model, _ROOT_ATTR, _QatState(linears=linears))
    model.forward = MethodType(_qat_root_forward, model)  # type: ignore[method-assign]
    return model


def disable_qat(model: nn.Module) -> nn.Module:
    """Restore the plain float forward pass (in place); no-op if QAT is not enabled."""
    root = getattr(model, _ROOT_ATTR, None)
    if not isinstance(root, _QatState):
        return model
    del model.forward
    delattr(model, _ROOT_ATTR)
    for linear in root.linears:
        if linear is not model:
            del linear.forward
        delattr(linear, _LINEAR_ATTR)
    return model


def is_qat_enabled(model: nn.Module) -> bool:
    return isinstance(getattr(model, _ROOT_ATTR, None), _QatState)
