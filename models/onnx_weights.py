"""Read and patch the weights inside a serialized ONNX model, without torch.

A global model travels as one ONNX file. Its initializers carry the same names as
the torch state_dict (`fc1.weight`, ...), so weights can be read out for local
training and written back for publishing by name, with onnx + numpy alone. That
keeps this module importable on inference-only devices and lets the aggregator
publish a new round without re-running the (slow) torch exporter.

Models whose tensors live in external data files are refused: a device receives
exactly one payload per version and must never resolve paths named by a model
it was sent.

Every refusal (not ONNX, external data, a name, shape or dtype that does not match) is
``fedge.errors.InvalidValue``, a ``ValueError`` too; ``parse_model`` is the one parser of
model bytes, ``models.int8`` included.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data

from fedge.errors import InvalidValue

__all__ = ["onnx_sha256", "parse_model", "read_initializers", "replace_initializers"]


def onnx_sha256(b: bytes) -> str:
    """Hex SHA-256 of the serialized model, the identity devices verify a download by."""
    return hashlib.sha256(b).hexdigest()


def read_initializers(onnx_bytes: bytes) -> dict[str, np.ndarray]:
    """Every float32 initializer of the main graph, by name, in file order.

    Non-float32 initializers (e.g. int64 shape constants an exporter may emit)
    are not weights and are skipped. Arrays are writable copies (numpy_helper
    returns read-only views of the protobuf buffer).
    """
    model = parse_model(onnx_bytes)
    return {
        tensor.name: numpy_helper.to_array(tensor).copy()
        for tensor in model.graph.initializer
        if tensor.data_type == onnx.TensorProto.FLOAT
    }


def replace_initializers(onnx_bytes: bytes, state: Mapping[str, np.ndarray]) -> bytes:
    """Return a copy of the model whose named initializers hold the values in `state`.

    Initializers not named in `state` are kept. Every name in `state` must exist,
    with the same shape and dtype: casting or reshaping here would hide a
    mismatch between the architecture a device trains and the one it runs.
    """
    model = parse_model(onnx_bytes)
    by_name = {tensor.name: tensor for tensor in model.graph.initializer}
    missing = sorted(name for name in state if name not in by_name)
    if missing:
        raise InvalidValue(f"model has no initializer(s) named {missing}; has {sorted(by_name)}")
    for name, value in state.items():
        tensor = by_name[name]
        array = np.asarray(value)
        expected_dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        if array.dtype != expected_dtype:
            raise InvalidValue(
                f"dtype mismatch for {name!r}: model has {expected_dtype}, got {array.dtype}"
            )
        expected_shape = tuple(tensor.dims)
        if array.shape != expected_shape:
            raise InvalidValue(
                f"shape mismatch for {name!r}: model has {expected_shape}, got {array.shape}"
            )
        tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), name=name))
    # deterministic=True: the same weights must give the same bytes (and sha256).
    return model.SerializeToString(deterministic=True)


def parse_model(onnx_bytes: bytes) -> onnx.ModelProto:
    """Parse and refuse anything that is not a self-contained model (``InvalidValue``)."""
    try:
        model = onnx.load_model_from_string(onnx_bytes)
    except DecodeError as exc:
        raise InvalidValue(f"not a serialized ONNX model: {exc}") from None
    # Protobuf happily parses many byte strings (b"" included) as an empty message.
    if not model.HasField("graph"):
        raise InvalidValue("not a serialized ONNX model: it has no graph")
    external = sorted(tensor.name for tensor in _tensors(model.graph) if uses_external_data(tensor))
    if external:
        raise InvalidValue(
            f"model stores tensors {external} as external data; "
            "only single-file models (all weights embedded) are accepted"
        )
    return model


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers plus tensors embedded in node attributes (Constant nodes)."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
