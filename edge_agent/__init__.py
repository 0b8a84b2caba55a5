"""edge_agent: the device role.

An explicit state machine over one broker session (``agent``), local training (``trainer``),
the upload pipeline (``uplink``), on-disk state (``store``, ``outbox``, ``residual``), and
inference with onnxruntime alone (``inference``: never imports torch).

Other packages (the simulation, the CLI) may import the modules listed below
(``tests/unit/test_public_faces.py`` pins them); the rest are the role's own.
"""

__all__ = [
    "agent",
    "cli",
    "config",
    "data",
    "inference",
    "model_cache",
    "secagg",
    "serving",
    "serving_store",
    "shadow",
    "store",
    "trainer",
    "uplink",
]
