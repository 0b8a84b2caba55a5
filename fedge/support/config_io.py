"""Loading a role's YAML config into its validated settings object, with one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from fedge.errors import ConfigError

__all__ = ["TLSConfig", "load_yaml_config", "validation_message"]

M = TypeVar("M", bound=BaseModel)


def validation_message(source: str, err: ValidationError) -> str:
    """``agent.yaml: data.path: Field required; brokr: unknown key`` — one line."""
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        parts.append(f"{where}: {msg}")
    return f"{source}: " + "; ".join(parts)


def load_yaml_config(path: Path, model: type[M]) -> M:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(validation_message(str(path), e)) from None


class TLSConfig(BaseModel):
    """Files for an mqtts:// broker: the CA to trust, and a client certificate for mTLS."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    ca_cert: Path
    client_cert: Path | None = None
    client_key: Path | None = None
