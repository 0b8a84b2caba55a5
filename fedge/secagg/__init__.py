"""Secure aggregation (SecAgg+ style): the aggregator learns only the sum of the survivors.

Pure protocol, no MQTT: ``ring`` (quantization into the smallest ring that holds the sum,
tight bit packing), ``prg`` (masks from ChaCha20 keyed through HKDF), ``shamir`` (t-of-n shares
of 32-byte secrets over the prime 2^256 + 297), ``crypto`` (X25519 agreement + HKDF, AEAD
share encryption), ``graph`` (the sparse neighbour graph from a public seed), ``envelope`` and
``messages`` (the signed wire messages), ``client`` (one device's round) and ``server`` (what the
aggregator keeps and how it recovers the sum). docs/protocol.md §16 is the byte-level contract.

The names below are the modules other packages may import.
"""

__all__ = [
    "client",
    "crypto",
    "envelope",
    "graph",
    "messages",
    "prg",
    "ring",
    "server",
    "shamir",
]
