"""The one small exception tree of fedge.

    FedgeError
     ├── ConfigError          a config file or command-line value is wrong (one line for the user)
     ├── InvalidValue         a value fedge parses is not valid (also a ValueError, see below):
     │                        codec name, device id or fleet name, TrainHyper, ONNX model bytes,
     │                        strategy name and options, staleness weight, broker URL,
     │                        raw Ed25519 key bytes
     ├── ProtocolError        a message breaks the wire contract (size, msgpack, schema, tensors)
     │    └── InvalidUpdate   a well-formed update the round cannot accept (round, nonce, duplicate)
     ├── TransportError       the broker cannot be reached or refuses us
     │    ├── BrokerUnavailable
     │    └── IdentityRefused the broker kept refusing our credentials (CONNACK 0x86/0x87/...)
     └── AggregationError     a round cannot produce a model

Third-party errors (paho, msgpack, zstandard, onnx, pydantic) are translated where they are
caught, so callers handle only these. ``InvalidValue`` is raised where a value is parsed,
whatever it came from; it also subclasses ``ValueError`` so that a pydantic validator or a
dataclass ``__post_init__`` that calls a parser reports it as pydantic and Python expect. Where
the value came off the wire, the envelope translates it into ``ProtocolError('schema')``.

``ProtocolError.reason`` is a short stable code used as the label of the rejection counters in
metrics.
"""

from __future__ import annotations

__all__ = [
    "AggregationError",
    "BrokerUnavailable",
    "ConfigError",
    "FedgeError",
    "IdentityRefused",
    "InvalidUpdate",
    "InvalidValue",
    "ProtocolError",
    "TransportError",
]


class FedgeError(Exception):
    """Base of every error fedge raises on purpose."""


class ConfigError(FedgeError):
    """A configuration value is missing or wrong; the message says what to write instead."""


class InvalidValue(FedgeError, ValueError):
    """A value is not one fedge accepts: the message says what is wrong and what to write.

    Raised by the parsers of the contract (``parse_codec``, ``validate_device_id``,
    ``Topics``, ``TrainHyper``, ``RoundTask``), of models (``models.onnx_weights``) and of
    strategies (``make_strategy``, strategy options, ``StalenessWeight``). A ``ValueError``
    too, for pydantic validators and dataclass ``__post_init__``: catch it as
    ``InvalidValue`` (or ``FedgeError``), not as ``ValueError``.
    """


class ProtocolError(FedgeError):
    """A message from the network breaks the wire contract.

    ``reason`` is a short code (``too_large``, ``bad_msgpack``, ``schema``, ``bad_tensor``,
    ``non_finite``, ...) counted per value in metrics; ``detail`` is for the log.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class InvalidUpdate(ProtocolError):
    """An update that decodes but that the current round must not count."""


class TransportError(FedgeError):
    """The MQTT transport failed."""


class BrokerUnavailable(TransportError):
    """No broker to talk to (not installed, not running, or unreachable)."""


class IdentityRefused(TransportError):
    """The broker refused this identity at every try of a bounded run: wrong password,
    revoked device, banned, or a username the ACL does not know. Retrying cannot help."""


class AggregationError(FedgeError):
    """A round could not produce a new model (e.g. quorum not met before the deadline)."""
