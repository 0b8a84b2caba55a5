"""The weights a new fleet starts from (``model.init``): the zoo's seeded initial model, or a
warm start from an ONNX file (e.g. a version kept in another aggregator's registry,
``STATE_DIR/models/vNNNNNN.onnx``, released or not: continual learning on new data from a
pinned serving version).

A warm start is read only when there is no checkpoint (a running fleet resumes its own
weights). The file's float32 initializers must match the configured architecture exactly:
the same names and shapes as ``build_model`` gives, finite. Anything else is a
``ConfigError`` at start, naming the first difference.
"""

from __future__ import annotations

import numpy as np

from aggregator.config import ModelConfig
from fedge.errors import ConfigError

__all__ = ["initial_weights"]


def initial_weights(model: ModelConfig) -> dict[str, np.ndarray]:
    from models.torch_state import to_numpy_state
    from models.zoo import build_model

    fresh = to_numpy_state(build_model(model.name, model.input_dim, model.num_classes, model.seed))
    if model.init is None:
        return fresh
    from models.onnx_weights import read_initializers

    path = model.init
    try:
        loaded = read_initializers(path.read_bytes())
    except OSError as e:
        raise ConfigError(f"model.init {model.init}: cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise ConfigError(
            f"model.init {model.init}: {path} is not a usable ONNX file: {e}"
        ) from None
    missing = sorted(set(fresh) - set(loaded))
    extra = sorted(set(loaded) - set(fresh))
    if missing or extra:
        raise ConfigError(
            f"model.init {path}: its tensors do not match model {model.name} "
            f"({model.input_dim} -> {model.num_classes}): missing {missing[:3]}, extra {extra[:3]}"
        )
    for name, want in fresh.items():
        got = loaded[name]
        if got.shape != want.shape:
            raise ConfigError(
                f"model.init {path}: {name} has shape {got.shape}, model {model.name} needs "
                f"{want.shape}"
            )
        if not np.isfinite(got).all():
            raise ConfigError(f"model.init {path}: {name} is not finite")
    return {k: loaded[k].astype(np.float32) for k in fresh}
