"""The IMU task: seglearn's watch set (simulation.imu) and the zoo's cnn1d."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from models.onnx_export import OnnxTemplate
from models.onnx_weights import read_initializers
from models.torch_state import to_numpy_state
from models.zoo import build_model
from simulation.datasets import FederatedData, make_federated
from simulation.imu import CHANNELS, NUM_CLASSES, SUBJECTS, WINDOW


@pytest.fixture(scope="module")
def imu10() -> FederatedData:
    return make_federated("imu", SUBJECTS, "iid", seed=0)


def test_one_device_per_subject_with_windows_of_fixed_width(imu10: FederatedData) -> None:
    assert imu10.input_dim == CHANNELS * WINDOW
    assert imu10.num_classes == NUM_CLASSES
    assert len(imu10.parts) == SUBJECTS
    for x, y in imu10.parts:
        assert x.shape[1] == CHANNELS * WINDOW
        assert len(x) > 100
        assert len(set(y.tolist())) == NUM_CLASSES  # every subject did every exercise
    assert set(imu10.test[1].tolist()) == set(range(NUM_CLASSES))


def test_train_and_test_windows_do_not_share_samples(imu10: FederatedData) -> None:
    train = {row.tobytes() for x, _ in imu10.parts for row in x}
    assert not any(row.tobytes() in train for row in imu10.test[0])


def test_fewer_devices_take_whole_subjects_and_more_are_refused(imu10: FederatedData) -> None:
    three = make_federated("imu", 3, "iid", seed=0)
    assert sum(three.sizes) == sum(imu10.sizes)
    # Device 0 has subjects 0, 3, 6, 9 of the ten.
    assert three.sizes[0] == sum(imu10.sizes[i] for i in (0, 3, 6, 9))
    with pytest.raises(ValueError, match="--devices must be in"):
        make_federated("imu", SUBJECTS + 1, "iid")


def test_cnn1d_exports_and_round_trips_like_torch(imu10: FederatedData) -> None:
    module = build_model("cnn1d", imu10.input_dim, NUM_CLASSES, seed=3)
    state = to_numpy_state(module)
    assert sum(v.size for v in state.values()) < 5000  # Pi-class

    onnx_bytes = OnnxTemplate("cnn1d", imu10.input_dim, NUM_CLASSES).render(state)

    back = read_initializers(onnx_bytes)
    assert set(back) == set(state)
    for k, v in state.items():
        np.testing.assert_array_equal(back[k], v)
    x = imu10.test[0][:9]
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = module.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(sess.run(["logits"], {"input": x})[0], expected, atol=1e-5)


def test_cnn1d_refuses_a_width_that_is_not_six_channels() -> None:
    with pytest.raises(ValueError, match="6 \\* T"):
        build_model("cnn1d", 385, NUM_CLASSES)
