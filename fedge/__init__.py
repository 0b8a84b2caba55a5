"""fedge: the wire contract every role and every device speaks.

Topics, envelopes (msgpack, validated on read), tensors and delta codecs, chunked models,
identities and signed bytes, the on-disk key registry, limits, norms and clipping, and the
one exception tree. Two subpackages sit beside the contract, under the roles: the MQTT runtime
(``fedge.transport``) and small utilities (``fedge.support``). Nothing here imports a role.

The names below are the modules other packages may import (``tests/unit/test_public_faces.py``
pins them). Import the submodule, not this package: ``from fedge.envelopes import RoundTask``.
"""

__all__ = [
    "chunks",
    "clipping",
    "codecs",
    "envelopes",
    "errors",
    "identity",
    "key_registry",
    "limits",
    "masks",
    "patches",
    "release_check",
    "secagg",
    "support",
    "task_check",
    "tensors",
    "topics",
    "trainable",
    "transport",
    "wire",
]
