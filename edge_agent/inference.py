"""Run a global model on a device with onnxruntime and numpy alone.

Inference-only devices do not ship torch (754 MB, 2-3 s to import); this module
and everything it imports must stay torch-free, which a test pins.

A model is accepted only as one self-contained file: external-data references
are resolved against an empty private directory, so a model that names one
fails to load instead of reading files next to the agent.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_errors

__all__ = ["OnnxPredictor", "load_input"]

# onnxruntime reports bad models with its own exception classes; callers see ValueError.
_MODEL_ERRORS = (
    _ort_errors.Fail,
    _ort_errors.InvalidArgument,
    _ort_errors.InvalidGraph,
    _ort_errors.InvalidProtobuf,
    _ort_errors.NoSuchFile,
    _ort_errors.NotImplemented,
)
_EXTERNAL_DATA_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


class OnnxPredictor:
    """Classifier over an ONNX model mapping float32 [batch, features] to logits."""

    def __init__(self, onnx_bytes: bytes, *, intra_op_num_threads: int = 1) -> None:
        """Load a model from bytes.

        One intra-op thread by default: edge devices have few cores, and the agent
        shares them with its MQTT loop and possibly local training.
        """
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_num_threads
        try:
            with tempfile.TemporaryDirectory(prefix="fedge-no-external-data-") as empty:
                options.add_session_config_entry(_EXTERNAL_DATA_FOLDER_KEY, empty)
                self._session = ort.InferenceSession(
                    onnx_bytes, sess_options=options, providers=["CPUExecutionProvider"]
                )
        except _MODEL_ERRORS as exc:
            raise ValueError(f"cannot load ONNX model: {exc}") from None
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"expected a model with one input, it has {len(inputs)}")
        (model_input,) = inputs
        if model_input.type != "tensor(float)" or len(model_input.shape) != 2:
            raise ValueError(
                f"expected a 2-D float input, model input {model_input.name!r} is "
                f"{model_input.type} with shape {model_input.shape}"
            )
        self._input_name: str = model_input.name
        feature_dim = model_input.shape[1]
        # A symbolic (str) or unknown (None) feature dimension cannot be checked here.
        self.input_dim: int | None = feature_dim if isinstance(feature_dim, int) else None

    @classmethod
    def from_path(cls, path: str | Path, *, intra_op_num_threads: int = 1) -> OnnxPredictor:
        """Load a model file; read as bytes so nothing beside the file is ever opened."""
        return cls(Path(path).read_bytes(), intra_op_num_threads=intra_op_num_threads)

    def predict_logits(self, x: np.ndarray) -> np.ndarray:
        """Float32 logits, shape [batch, num_classes]."""
        batch = self._validate(x)
        (logits,) = self._session.run(None, {self._input_name: batch})
        return np.asarray(logits)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """int64 class ids, shape [batch]."""
        return np.argmax(self.predict_logits(x), axis=1).astype(np.int64)

    def _validate(self, x: np.ndarray) -> np.ndarray:
        array = np.asarray(x)
        if array.ndim != 2:
            raise ValueError(
                f"expected a 2-D array [batch, features], got shape {array.shape}; "
                "for one sample use x.reshape(1, -1)"
            )
        if array.dtype.kind != "f":
            raise ValueError(f"expected a float array, got dtype {array.dtype}")
        if self.input_dim is not None and array.shape[1] != self.input_dim:
            raise ValueError(
                f"model expects {self.input_dim} features per sample, got {array.shape[1]}"
            )
        return np.ascontiguousarray(array, dtype=np.float32)


def load_input(path: str | Path) -> np.ndarray:
    """Read samples for `predict` as a float32 [batch, features] array.

    `.npy` (a 2-D array), `.npz` (array under key "x") or `.csv` (comma-separated
    floats, one row per sample; a first row without any number is a header, skipped).
    Values are the model's inputs as trained: digits pixels are 0..16 divided by 16.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        array = np.load(path, allow_pickle=False)
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive.files:
                raise ValueError(f"{path}: no array named 'x' (has {archive.files})")
            array = archive["x"]
    elif suffix == ".csv":
        try:
            with warnings.catch_warnings():
                # An empty file warns, then is reported as an error below.
                warnings.simplefilter("ignore", UserWarning)
                array = np.loadtxt(
                    path, delimiter=",", dtype=np.float64, ndmin=2, skiprows=_header_rows(path)
                )
        except ValueError as exc:
            raise ValueError(f"{path}: not comma-separated floats: {exc}") from None
    else:
        raise ValueError(f"{path}: unsupported input format {suffix!r}; use .npy, .npz or .csv")
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(f"{path}: expected a non-empty 2-D array, got shape {array.shape}")
    if array.dtype.kind not in "fiu":
        raise ValueError(f"{path}: expected numbers, got dtype {array.dtype}")
    return np.ascontiguousarray(array, dtype=np.float32)


def _header_rows(path: Path) -> int:
    """Lines to skip: up to the first non-empty row when none of its cells is a number
    (column names), else 0; a row mixing numbers and words is an error, not a header."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f):
            if line.strip():
                return 0 if any(_is_number(cell) for cell in line.split(",")) else i + 1
    return 0


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
