"""fedge.support.config_io: what an operator's YAML mistake turns into."""

from __future__ import annotations

from pathlib import Path

import pytest

from aggregator.config import AggregatorConfig
from fedge.errors import ConfigError
from fedge.support.config_io import load_yaml_config


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (
            "broker: mqtt://a:1\nfleet: f\nbroker: mqtt://b:2\n",
            "broker: given twice (again on line 3)",
        ),
        ("hyper:\n  epochs: 1\n  epochs: 2\n", "epochs: given twice (again on line 3)"),
    ],
)
def test_a_key_given_twice_is_refused(tmp_path: Path, text: str, where: str) -> None:
    # PyYAML kept the last value silently: a second broker: lower down won.
    cfg = tmp_path / "aggregator.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_yaml_config(cfg, AggregatorConfig)
    assert str(e.value) == f"{cfg}: not valid YAML: {where}"


def test_a_config_without_repeats_still_loads(tmp_path: Path) -> None:
    cfg = tmp_path / "aggregator.yaml"
    cfg.write_text("broker: mqtt://a:1\nhyper: {epochs: 2}\nmodel: {name: mlp}\n")
    c = load_yaml_config(cfg, AggregatorConfig)
    assert (c.broker, c.hyper.epochs, c.model.name) == ("mqtt://a:1", 2, "mlp")
