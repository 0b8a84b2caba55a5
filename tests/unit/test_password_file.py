"""``password_file`` for agent and aggregator: read at start, one line when it cannot be."""

from __future__ import annotations

from pathlib import Path

import pytest

from aggregator.config import AggregatorConfig, load_aggregator_config
from edge_agent.config import AgentConfig, load_agent_config
from fedge.errors import ConfigError

LOADERS = [
    pytest.param(load_agent_config, "data: d.npz\n", id="agent"),
    pytest.param(load_aggregator_config, "", id="aggregator"),
]


@pytest.mark.parametrize(("load", "base"), LOADERS)
def test_password_is_read_from_the_file(load: object, base: str, tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret-token\n")  # as `echo` or an editor leaves it
    cfg = tmp_path / "role.yaml"
    cfg.write_text(f"{base}password_file: {secret}\n")

    got = load(cfg)  # type: ignore[operator]

    assert got.password == "s3cret-token"


@pytest.mark.parametrize(("load", "base"), LOADERS)
def test_missing_password_file_is_one_line(load: object, base: str, tmp_path: Path) -> None:
    cfg = tmp_path / "role.yaml"
    cfg.write_text(f"{base}password_file: {tmp_path}/nope\n")

    with pytest.raises(ConfigError) as err:
        load(cfg)  # type: ignore[operator]

    assert str(err.value) == (
        f"{cfg}: password_file {tmp_path}/nope: cannot read it: No such file or directory"
    )


def test_unreadable_and_conflicting_password_files_are_refused(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("one\ntwo\n")
    with pytest.raises(ValueError, match="on one line"):
        AgentConfig(data=Path("d.npz"), password_file=secret)
    secret.write_text("right")
    with pytest.raises(ValueError, match="password or password_file, not both"):
        AggregatorConfig(password="other", password_file=secret)
    # a config dumped and validated again keeps working
    cfg = AggregatorConfig(password_file=secret)
    assert AggregatorConfig.model_validate(cfg.model_dump()).password == "right"
