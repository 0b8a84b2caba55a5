"""The messages of wire contract v1, as frozen dataclasses: one module per family.

    task.py     RoundTask (signed by the aggregator)
    update.py   ModelUpdate (signed by the device)
    model.py    ModelArch, GlobalModel (signed), ModelChunk
    patch.py    ModelPatch (signed; the arithmetic is fedge.patches)
    status.py   DeviceStatus, Receipt
    release.py  ReleaseManifest (signed), ShadowReport, the cohort rule
    hyper.py    TrainHyper and HYPER_BOUNDS
    common.py   schema version, kinds, field readers

Each message has ``to_bytes()`` and a validating ``from_bytes(payload, limits)``. On the wire
an envelope is a msgpack map with ``v`` (schema version) and ``kind``; tensors travel inside
the codec blob as ``bin``. ``docs/protocol.md`` is the normative description. Other packages
import the names below from ``fedge.envelopes`` (its face); the modules are its own.
"""

from fedge.envelopes.common import SCHEMA_VERSION, DeviceState, Kind
from fedge.envelopes.hyper import HYPER_BOUNDS, Bounds, TrainHyper
from fedge.envelopes.model import GlobalModel, ModelArch, ModelChunk
from fedge.envelopes.patch import ModelPatch
from fedge.envelopes.release import (
    ReleaseManifest,
    ReleaseMode,
    ShadowReport,
    cohort_bound,
    cohort_hash,
    in_cohort,
)
from fedge.envelopes.status import DeviceStatus, Receipt
from fedge.envelopes.task import RoundTask
from fedge.envelopes.update import ModelUpdate

__all__ = [
    "HYPER_BOUNDS",
    "SCHEMA_VERSION",
    "Bounds",
    "DeviceState",
    "DeviceStatus",
    "GlobalModel",
    "Kind",
    "ModelArch",
    "ModelChunk",
    "ModelPatch",
    "ModelUpdate",
    "Receipt",
    "ReleaseManifest",
    "ReleaseMode",
    "RoundTask",
    "ShadowReport",
    "TrainHyper",
    "cohort_bound",
    "cohort_hash",
    "in_cohort",
]
