"""Size limits shared by both ends of the wire.

Every payload from the network is checked against these *before* any decompression or
unpacking work. ``MAX_PACKET_SIZE`` equals ``max_packet_size`` in ``broker_config/``: paho does
not check it before sending, and an oversize publish makes the broker drop the connection,
so the sender checks it itself.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_LIMITS", "MAX_PACKET_SIZE", "MAX_STATUS_BYTES", "Limits"]

MAX_PACKET_SIZE = 16 * 1024 * 1024
"""Must equal ``max_packet_size`` in broker_config/*.conf."""

MAX_STATUS_BYTES = 1024
"""A DeviceStatus is about 100 bytes. Mosquitto cannot bound the size of a retained message
per topic (``max_packet_size`` and ``message_size_limit`` are global), so the aggregator
refuses a longer status and clears it if it was retained (protocol §5.6)."""

# Fixed header (5) + topic length (2) + topic + packet id (2) + properties (a few bytes).
_PUBLISH_OVERHEAD_ALLOWANCE = 1024


@dataclass(frozen=True)
class Limits:
    """Bounds on what a peer may make us allocate."""

    max_payload_bytes: int = MAX_PACKET_SIZE - _PUBLISH_OVERHEAD_ALLOWANCE
    max_decompressed_bytes: int = 256 * 1024 * 1024
    max_tensors: int = 4096
    max_tensor_elements: int = 64 * 1024 * 1024
    max_rank: int = 8
    max_str_len: int = 256
    max_map_len: int = 64
    max_array_len: int = 100_000
    max_num_samples: int = 10_000_000
    max_model_bytes: int = 1024 * 1024 * 1024
    # A round id may lead its base version by the fleet's failed rounds plus one, no more: a
    # device refuses a task with round - base_version above this (docs/protocol.md §9.2).
    max_round_lead: int = 2**20

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"Limits.{name} must be a positive int, got {value!r}")


DEFAULT_LIMITS = Limits()
