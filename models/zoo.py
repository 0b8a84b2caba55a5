"""Registry of the torch architectures fedge can train, by name.

Devices and the aggregator agree on a model by its name plus (input_dim,
num_classes): both sides call `build_model` and must get identical parameter
names and shapes, so the numpy state dicts they exchange line up. Initial weights
are a pure function of the seed, so every participant can rebuild round 0
without shipping it.

Every model maps float32 `[batch, input_dim]` to float32 logits
`[batch, num_classes]`; softmax is left to the loss and to the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ModelSpec", "build_model", "list_models", "register_factory"]


@dataclass(frozen=True)
class ModelSpec:
    """What a registry entry is called and what it is, for CLIs and configs."""

    name: str
    description: str


class MLP(nn.Module):
    """Two hidden layers of 64; attribute names fix the state_dict keys (fc1.weight, ...)."""

    def __init__(self, input_dim: int, num_classes: int, hidden: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(input_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


class LogReg(nn.Module):
    """Multinomial logistic regression: one linear layer emitting logits."""

    def __init__(self, input_dim: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(input_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class CNN1D(nn.Module):
    """A Pi-class 1D-CNN for six-axis IMU windows (``simulation.imu``): the flat input
    ``[batch, 6 * T]`` is channel-major, reshaped to ``[batch, 6, T]``; two convolutions
    (16 and 32 channels, kernel 5, ReLU, the first max-pooled by 2), global average pooling,
    one Linear. 3.3 k parameters. The reshape uses only the constant 6, so removing output
    channels (structured pruning) leaves the graph valid."""

    channels = 6

    def __init__(self, input_dim: int, num_classes: int) -> None:
        super().__init__()
        if input_dim % self.channels or input_dim // self.channels < 8:
            raise ValueError(f"cnn1d needs input_dim = 6 * T with T >= 8, got {input_dim}")
        self.conv1 = nn.Conv1d(self.channels, 16, kernel_size=5, padding=2)
        self.conv2 = nn.Conv1d(16, 32, kernel_size=5, padding=2)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], self.channels, -1)
        x = torch.max_pool1d(torch.relu(self.conv1(x)), 2)
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean(dim=2))


_Factory = Callable[[int, int], nn.Module]


# name -> (spec, factory). Adding an architecture is one entry here.
_REGISTRY: dict[str, tuple[ModelSpec, _Factory]] = {
    "cnn1d": (ModelSpec("cnn1d", "1D-CNN for 6-axis IMU windows (16, 32 channels)"), CNN1D),
    "logreg": (ModelSpec("logreg", "multinomial logistic regression (one Linear)"), LogReg),
    "mlp": (ModelSpec("mlp", "MLP, two ReLU hidden layers of 64 units"), MLP),
}


def register_factory(ref: str) -> str:
    """Register a model of your own, named by ``package.module:factory`` (the name it goes by
    in configs and on the wire), without editing the zoo; returns the name.

    ``factory(input_dim, num_classes)`` must return an ``nn.Module`` mapping float32
    ``[batch, input_dim]`` to logits ``[batch, num_classes]``; checked here on a dummy batch.
    The export round trip (ONNX initializer names equal ``state_dict`` keys, bit-exact) is
    checked when the aggregator renders version 0. Only names a process registers itself
    are built: a model name read off the wire never imports anything.
    """
    import importlib

    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr.isidentifier():
        raise ValueError(f"model {ref!r}: write package.module:factory")
    if ref in _REGISTRY:
        return ref
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"model {ref!r}: cannot import it: {e}") from None
    if not callable(factory):
        raise ValueError(f"model {ref!r}: {attr} is not callable")
    _REGISTRY[ref] = (ModelSpec(ref, f"custom: {ref}"), factory)
    try:
        probe = build_model(ref, 3, 2)
        with torch.no_grad():
            out = probe(torch.zeros(2, 3))
    except Exception as e:
        del _REGISTRY[ref]
        raise ValueError(f"model {ref!r}: factory(3, 2) failed on a [2, 3] batch: {e}") from None
    if not isinstance(probe, nn.Module) or tuple(out.shape) != (2, 2):
        del _REGISTRY[ref]
        raise ValueError(f"model {ref!r}: factory(3, 2) must map [2, 3] to logits [2, 2]")
    return ref


def list_models() -> list[ModelSpec]:
    """All registered architectures, sorted by name."""
    return [_REGISTRY[name][0] for name in sorted(_REGISTRY)]


def build_model(name: str, input_dim: int, num_classes: int, seed: int = 0) -> nn.Module:
    """Build a registered model with weights that depend only on `seed`.

    The global torch RNG is forked, so building a model neither depends on nor
    disturbs whatever random state the caller (a training loop) is using.
    """
    entry = _REGISTRY.get(name)
    if entry is None:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown model {name!r}; known: {known}")
    if input_dim < 1:
        raise ValueError(f"input_dim must be >= 1, got {input_dim}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (logits are argmax-ed), got {num_classes}")
    _, factory = entry
    # devices=[] keeps fork_rng from touching (or warning about) CUDA.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory(input_dim, num_classes)
