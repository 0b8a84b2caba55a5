"""The one small exception tree of fedge.

    FedgeError
     ├── ConfigError          a config file or command-line value is wrong (one line for the user)
     ├── ProtocolError        a message breaks the wire contract (size, msgpack, schema, tensors)
     │    └── InvalidUpdate   a well-formed update the round cannot accept (round, nonce, duplicate)
     ├── TransportError       the broker cannot be reached or refuses us
     │    └── BrokerUnavailable
     └── AggregationError     a round cannot produce a model

Third-party errors (paho, msgpack, zstandard, onnx, pydantic) are translated where they are
caught, so callers handle only these. ``ProtocolError.reason`` is a short stable code used as the
label of the rejection counters in metrics.
"""

from __future__ import annotations

__all__ = [
    "AggregationError",
    "BrokerUnavailable",
    "ConfigError",
    "FedgeError",
    "InvalidUpdate",
    "ProtocolError",
    "TransportError",
]


class FedgeError(Exception):
    """Base of every error fedge raises on purpose."""


class ConfigError(FedgeError):
    """A configuration value is missing or wrong; the message says what to write instead."""


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


class AggregationError(FedgeError):
    """A round could not produce a new model (e.g. quorum not met before the deadline)."""
