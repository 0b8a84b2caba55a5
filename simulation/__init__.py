"""simulation: a whole fleet on one machine over a real Mosquitto (the top layer, beside the CLI).

``fleet`` runs ``fedge simulate``; ``broker`` starts a Mosquitto on a free loopback port from
``broker_config/``; ``datasets``, ``partition``, ``synthetic`` make the devices' data; ``keys``
an enrolled key registry for a simulated fleet. Names listed below may be imported by the CLI
(``tests/unit/test_public_faces.py`` pins them).
"""

__all__ = [
    "DEFAULT_DOWNLINK_CODEC",
    "DEFAULT_SIM_CODEC",
    "broker",
    "datasets",
    "default_codec",
    "fleet",
    "keys",
    "partition",
    "synthetic",
]

# The best codec within 1 pp of fp32's final accuracy on digits (bench/compression). Defined
# here, not in fleet.py, so that the CLI's parser has it without importing the fleet.
DEFAULT_SIM_CODEC = "topk:0.03+int4+zstd"

# How new versions reach simulated devices: signed model patches with server-side error
# feedback (bench/bytes, docs/benchmarks.md); "full" sends the whole model every version.
DEFAULT_DOWNLINK_CODEC = "topk:0.07+int4+zstd"


def default_codec(strategy: str) -> str:
    """``DEFAULT_SIM_CODEC``, or a dense codec for a strategy that compares updates coordinate
    by coordinate (median, trimmed mean, Krum): top-k deltas are zero almost everywhere."""
    from aggregator.config import DENSE_CODEC
    from aggregator.strategies import STRATEGIES

    cls = STRATEGIES.get(strategy.strip().lower())
    return DENSE_CODEC if cls is not None and cls.dense_updates else DEFAULT_SIM_CODEC
