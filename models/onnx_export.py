"""Export torch models to self-contained ONNX, once per architecture.

Uses the TorchScript exporter (``dynamo=False``, opset 17): for our feed-forward
models it keeps parameter names as initializer names and stores Linear weights
untransposed (Gemm transB=1), so ONNX initializers equal the torch state_dict
bit for bit. `export_onnx` verifies that on every export rather than trusting
it, because `OnnxTemplate.render` relies on it. The dynamo exporter gives the
same initializers but took 2.6-4.4 s on its first call and pulled torch.export
and sympy into the process (about 60 MB more RSS on a 10-device simulation).

The aggregator publishes a new global model every round, so `OnnxTemplate`
exports once per architecture and then only patches weights into the cached
bytes (render: 0.08 ms for the digits MLP).
"""

from __future__ import annotations

import io
import logging
import threading
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import onnx
import torch
from torch import nn

from models.onnx_weights import read_initializers, replace_initializers
from models.torch_state import to_numpy_state
from models.zoo import build_model

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "OnnxTemplate", "export_onnx"]

INPUT_NAME = "input"
OUTPUT_NAME = "logits"

# The exporter is not re-entrant, and silencing it below touches process-wide
# state (warning filters, logger levels); one export at a time.
_EXPORT_LOCK = threading.Lock()


def export_onnx(module: nn.Module, input_dim: int) -> bytes:
    """Export `module` (float32 [batch, input_dim] -> logits) as one ONNX file.

    The batch axis is dynamic, weights are embedded (no external data file), and
    initializer names and values are checked to equal `to_numpy_state(module)`.
    The module is exported in eval mode; its training flag is restored afterwards.
    """
    if input_dim < 1:
        raise ValueError(f"input_dim must be >= 1, got {input_dim}")
    # Batch 2, not 1: torch.export specializes sizes 0 and 1 to constants.
    example = torch.zeros(2, input_dim, dtype=torch.float32)
    was_training = module.training
    module.eval()
    try:
        with _EXPORT_LOCK, _quiet_exporter():
            # The TorchScript exporter (dynamo=False): for these feed-forward models it gives
            # the same graph and bit-exact initializers, starts in ~0.1 s instead of 2.6-4.4 s,
            # and does not pull torch.export/sympy into the process (~60 MB RSS measured).
            buf = io.BytesIO()
            # A file object works; torch's annotation names only paths.
            torch.onnx.export(
                module,
                (example,),
                buf,  # type: ignore[arg-type]
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                dynamo=False,
                opset_version=17,
                do_constant_folding=False,
            )
            # Serialized in memory: weights are always embedded, no file is written.
            onnx_bytes = buf.getvalue()
    finally:
        module.train(was_training)
    _check_export(onnx_bytes, to_numpy_state(module))
    return onnx_bytes


class OnnxTemplate:
    """An architecture exported once; `render` produces a model file for any weights.

    The export is lazy (first `render` or `template_bytes`) and cached, so
    constructing a template is free. Thread-safe.
    """

    def __init__(self, model_name: str, input_dim: int, num_classes: int) -> None:
        # Building the module validates the arguments now rather than at first render.
        self._module = build_model(model_name, input_dim, num_classes)
        self.model_name = model_name
        self.input_dim = input_dim
        self.num_classes = num_classes
        self._bytes: bytes | None = None
        self._names: frozenset[str] = frozenset()
        self._lock = threading.Lock()

    @property
    def template_bytes(self) -> bytes:
        """The exported model, with the seed-0 initial weights."""
        with self._lock:
            if self._bytes is None:
                self._bytes = export_onnx(self._module, self.input_dim)
                self._names = frozenset(read_initializers(self._bytes))
            return self._bytes

    def render(self, state: Mapping[str, np.ndarray]) -> bytes:
        """A serialized model holding exactly the weights in `state` (all of them).

        A partial state is refused: it would silently publish template weights.
        """
        template = self.template_bytes
        missing = sorted(self._names - set(state))
        if missing:
            raise ValueError(f"state lacks weights {missing} for model {self.model_name!r}")
        return replace_initializers(template, state)


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hide exporter noise that is not actionable for fedge users.

    - FutureWarning/DeprecationWarning raised by torch internals from stdlib
      frames (copyreg: "isinstance(treespec, LeafSpec) is deprecated"), which
      pytest's per-module ignores cannot attribute to torch.
    - logger warnings "torchvision is not installed. Skipping torchvision::nms".
    """
    logger = logging.getLogger("torch.onnx")
    previous_level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(previous_level)


def _check_export(onnx_bytes: bytes, expected: Mapping[str, np.ndarray]) -> None:
    """Fail loudly if the exporter renamed, transposed or folded any weight."""
    model = onnx.load_model_from_string(onnx_bytes)
    inputs = [value.name for value in model.graph.input]
    outputs = [value.name for value in model.graph.output]
    if inputs != [INPUT_NAME] or outputs != [OUTPUT_NAME]:
        raise RuntimeError(f"exporter produced inputs {inputs}, outputs {outputs}")
    actual = read_initializers(onnx_bytes)
    if set(actual) != set(expected):
        raise RuntimeError(
            f"exporter changed weight names: state_dict {list(expected)}, onnx {list(actual)}"
        )
    for name, value in expected.items():
        if actual[name].shape != value.shape or not np.array_equal(actual[name], value):
            raise RuntimeError(f"exporter changed the values or layout of {name!r}")
