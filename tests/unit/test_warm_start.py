"""Warm start (``model.init``, aggregator/warm_start.py) and models of your own
(``package.module:factory``, models.zoo.register_factory), on the real service over the
in-memory broker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from torch import nn

from aggregator.config import AggregatorConfig, ModelConfig
from aggregator.service import Aggregator
from fedge.errors import ConfigError
from fedge.transport.memory import ManualLoop, MemoryBroker
from models.onnx_weights import read_initializers
from models.zoo import build_model, list_models, register_factory


class Tiny(nn.Module):
    """A model of our own: one hidden layer of 8 (names head.*, not the zoo's)."""

    def __init__(self, input_dim: int, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Linear(input_dim, 8)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: Any) -> Any:
        return self.head(self.body(x).relu())


def tiny(input_dim: int, num_classes: int) -> nn.Module:
    return Tiny(input_dim, num_classes)


def not_a_model(input_dim: int, num_classes: int) -> nn.Module:
    return nn.Linear(input_dim, num_classes + 1)


TINY = f"{__name__}:tiny"


def start(tmp_path: Path, name: str, **model: Any) -> Aggregator:
    config = AggregatorConfig(
        broker="mqtt://127.0.0.1:1",
        fleet="unit",
        state_dir=tmp_path / "agg",
        model=ModelConfig(name=name, input_dim=8, num_classes=3, **model),
    )
    loop = ManualLoop()
    agg = Aggregator(config, loop, session_factory=MemoryBroker().session)
    agg.start()
    loop.run()
    STARTED.append((agg, loop))
    return agg


STARTED: list[tuple[Aggregator, ManualLoop]] = []


@pytest.fixture(autouse=True)
def _stop_all(monkeypatch: pytest.MonkeyPatch) -> Any:
    import models.zoo

    # Registrations stay in this test's copy: `fedge models` elsewhere lists the zoo alone.
    monkeypatch.setattr(models.zoo, "_REGISTRY", dict(models.zoo._REGISTRY))
    yield
    while STARTED:
        agg, loop = STARTED.pop()
        agg.stop()  # closes the round journal
        loop.run()


def test_a_model_of_your_own_is_registered_exported_and_round_trips(tmp_path: Path) -> None:
    agg = start(tmp_path, TINY)
    assert TINY in [m.name for m in list_models()]
    onnx, meta = agg.registry.load(0)
    weights = read_initializers(onnx)
    assert sorted(weights) == ["body.bias", "body.weight", "head.bias", "head.weight"]
    for k, v in agg.weights.items():
        np.testing.assert_array_equal(weights[k], v)
    assert meta["arch"]["name"] == TINY


def test_models_of_your_own_are_checked_before_use() -> None:
    for bad in ("no_colon", "tests.nowhere:tiny", f"{__name__}:absent", f"{__name__}:TINY"):
        with pytest.raises(ValueError, match="model"):
            register_factory(bad)
    with pytest.raises(ValueError, match=r"logits \[2, 2\]"):
        register_factory(f"{__name__}:not_a_model")
    with pytest.raises(ValueError, match="unknown model"):  # never registered: not built
        build_model(f"{__name__}:not_a_model", 8, 3)


def test_warm_start_begins_from_the_file_and_refuses_one_that_does_not_fit(
    tmp_path: Path,
) -> None:
    donor = start(tmp_path / "donor", "mlp", seed=7)
    path = donor.registry.path(0)
    agg = start(tmp_path / "warm", "mlp", seed=0, init=path)
    want = read_initializers(path.read_bytes())
    for k, v in agg.weights.items():
        np.testing.assert_array_equal(v, want[k])
    cold = build_model("mlp", 8, 3, seed=0).state_dict()
    assert not np.array_equal(agg.weights["fc1.weight"], cold["fc1.weight"].numpy())
    with pytest.raises(ConfigError, match="do not match"):
        start(tmp_path / "wrong", "logreg", init=path)
    with pytest.raises(ConfigError, match="cannot read"):
        start(tmp_path / "missing", "mlp", init=tmp_path / "nothing.onnx")
