"""Loading a role's YAML config into its validated settings object, with one-line errors."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from fedge.errors import ConfigError, InvalidValue

__all__ = [
    "TLSConfig",
    "load_yaml_config",
    "read_password_file",
    "tls_context",
    "validation_message",
]

M = TypeVar("M", bound=BaseModel)


def validation_message(source: str, err: ValidationError) -> str:
    """``agent.yaml: data.path: Field required; brokr: unknown key`` — one line."""
    parts = []
    for e in err.errors():
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        msg = msg.removeprefix("Value error, ")
        where = ".".join(str(p) for p in e["loc"])
        parts.append(f"{where}: {msg}" if where else msg)
    return f"{source}: " + "; ".join(parts)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping: PyYAML silently
    keeps the last, so a second ``broker:`` further down a long config overrode the first."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[object, object]:
        if isinstance(node, yaml.MappingNode):
            seen: set[object] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    line = key_node.start_mark.line + 1
                    raise yaml.constructor.ConstructorError(
                        None, None, f"{key}: given twice (again on line {line})"
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)  # type: ignore[arg-type]


def load_yaml_config(path: Path, model: type[M]) -> M:
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}  # a SafeLoader subclass
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


def read_password_file(raw: object) -> object:
    """For a role's ``mode="before"`` validator: ``password_file`` read into ``password``.

    Read once, at start, so a missing or unreadable file is one line before any connection
    (not a broker refusing an empty password later). One trailing newline is dropped (``echo``
    and editors add one; ``fedge enroll`` writes none).
    """
    if not isinstance(raw, dict) or raw.get("password_file") is None:
        return raw
    path = Path(str(raw["password_file"]))
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ValueError(f"password_file {path}: cannot read it: {why}") from None
    password = text.removesuffix("\n").removesuffix("\r")
    if not password or "\n" in password:
        raise ValueError(f"password_file {path}: expected the password on one line")
    # Equal is a config dumped and validated again, not two sources that disagree.
    if raw.get("password") not in (None, password):
        raise ValueError("set password or password_file, not both")
    return {**raw, "password": password}


class TLSConfig(BaseModel):
    """Files for an mqtts:// broker: the CA to trust, and a client certificate for mTLS.

    Each is loaded at validation (``tls_context``): a missing, unreadable or non-PEM file is one
    line naming it at start, not an ``[Errno 2]`` from paho later."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    ca_cert: Path
    client_cert: Path | None = None
    client_key: Path | None = None

    @model_validator(mode="after")
    def _loadable(self) -> TLSConfig:
        tls_context(
            str(self.ca_cert),
            None if self.client_cert is None else str(self.client_cert),
            None if self.client_key is None else str(self.client_key),
        )
        return self


def tls_context(
    ca_cert: str | None, client_cert: str | None = None, client_key: str | None = None
) -> ssl.SSLContext:
    """What paho's ``tls_set`` builds (server certificate and host name checked), each
    unusable file named in an ``InvalidValue`` (a ``ValueError`` for pydantic too)."""
    if ca_cert is not None:
        _readable("tls.ca_cert", ca_cert)
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if ca_cert is not None:
            ctx.load_verify_locations(cafile=ca_cert)
    except (OSError, ssl.SSLError) as e:
        raise InvalidValue(f"tls.ca_cert {ca_cert}: {_tls_why(e)}") from None
    if client_cert is not None:
        _readable("tls.client_cert", client_cert)
        if client_key is not None:
            _readable("tls.client_key", client_key)
        try:
            ctx.load_cert_chain(client_cert, client_key)
        except (OSError, ssl.SSLError) as e:
            raise InvalidValue(
                f"tls.client_cert {client_cert} / tls.client_key {client_key}: {_tls_why(e)}"
            ) from None
    return ctx


def _readable(what: str, path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise InvalidValue(f"{what} {path}: cannot read it: {e.strerror or e}") from None


def _tls_why(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError):
        return f"not a PEM certificate (or key) that TLS can use ({e.reason or e})"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e)
