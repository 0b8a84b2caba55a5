"""aggregator: the aggregator role.

The service (``service``: wiring and routing) over the round lifecycle, its modes, the intake
of updates, durable state and publishing; strategies (``strategies``: self-contained, plain
numpy); the sharding wing (``sharded``); site gateways (``gateway``); metrics sinks (``metrics``).

Other packages (the simulation, the CLI) may import the modules listed below
(``tests/unit/test_public_faces.py`` pins them); the rest are the role's own.
"""

__all__ = [
    "cli",
    "config",
    "evaluation",
    "gateway",
    "keyring",
    "metrics",
    "prune_config",
    "rollout",
    "rollout_requests",
    "rollout_state",
    "service",
    "sharded",
    "strategies",
]
