"""``ReleaseManifest``: which version devices serve (retained on ``{p}/release``, signed by the
aggregator), the cohort rule of a staged rollout, and ``ShadowReport``, a device's shadow
evaluation of a candidate, carried in its status (protocol §5.8).

Serving versions are separate from training versions: a device trains on whatever
``{p}/model/global`` holds, and answers inference with the version the newest manifest gives
it. A manifest names a candidate ``version`` and the last known good ``previous``; a device
whose cohort hash is at most ``cohort`` serves the candidate (after its shadow evaluation, in
``canary`` mode), every other device serves ``previous``. ``seq`` only grows: a device refuses a
manifest whose ``seq`` is not above the one it holds, so a replayed or stale manifest cannot
move what it serves, while an older *version* in a newer manifest (a rollback) is taken.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass
from enum import StrEnum
from fractions import Fraction
from typing import Any, Self

from fedge.envelopes.common import _MAX_ROUND, SCHEMA_VERSION, SIGNATURE_BYTES, Kind, _open
from fedge.errors import InvalidValue, ProtocolError
from fedge.limits import DEFAULT_LIMITS, Limits
from fedge.topics import validate_device_id
from fedge.wire import Fields, pack

__all__ = [
    "MAX_STAGES",
    "RELEASE_TAG",
    "ReleaseManifest",
    "ReleaseMode",
    "ShadowReport",
    "cohort_bound",
    "cohort_hash",
    "in_cohort",
    "release_digest",
]

RELEASE_TAG = b"fedge.release.v1"  # 16 bytes, like the other signed layouts' tags
MAX_STAGES = 16
_U64 = 2**64


class ReleaseMode(StrEnum):
    CANARY = "canary"  # the cohort evaluates the candidate against what it serves, then switches
    DIRECT = "direct"  # everyone in the cohort serves ``version`` at once (rollback, abort)


def cohort_hash(fleet: str, device: str) -> int:
    """The first 8 bytes of sha256(``fleet`` "|" ``device``) (UTF-8) as a big-endian u64."""
    digest = hashlib.sha256(f"{fleet}|{device}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def cohort_bound(fraction: float) -> int:
    """The largest cohort hash inside a stage of ``fraction``: ceil(fraction * 2^64) - 1,
    computed exactly from the float (so fraction 1 is 2^64 - 1: every device). A device is in
    the cohort iff ``cohort_hash <= bound``, i.e. hash / 2^64 < fraction."""
    if not (isinstance(fraction, float | int) and 0 < fraction <= 1):
        raise InvalidValue(f"a stage fraction must be in (0, 1], got {fraction!r}")
    return math.ceil(Fraction(fraction) * _U64) - 1


def in_cohort(fleet: str, device: str, bound: int) -> bool:
    return cohort_hash(fleet, device) <= bound


def release_digest(m: ReleaseManifest) -> bytes:
    """The bytes the aggregator signs for a manifest (integers big-endian, floats binary64):

    RELEASE_TAG | u8 len(fleet) | fleet | u32 seq | u32 version | sha256(candidate) 32
    | u8 has_previous | u32 previous (0) | sha256(previous) 32 (zeros)
    | u8 stage | u8 count | f64 fraction * count | u64 cohort | u8 mode (0 canary, 1 direct)
    | f64 max_regression | f64 issued
    """
    fleet = m.fleet.encode("ascii")
    prev = m.previous is not None
    parts = [
        RELEASE_TAG,
        bytes([len(fleet)]) + fleet,
        struct.pack(">II", m.seq, m.version),
        bytes.fromhex(m.sha256),
        struct.pack(">BI", prev, m.previous or 0),
        bytes.fromhex(m.previous_sha256) if prev else bytes(32),
        struct.pack(">BB", m.stage, len(m.stages)),
        b"".join(struct.pack(">d", s) for s in m.stages),
        struct.pack(">QB", m.cohort, 0 if m.mode == ReleaseMode.CANARY else 1),
        struct.pack(">dd", m.max_regression, m.issued),
    ]
    return b"".join(parts)


def _sha(value: str, what: str) -> str:
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise InvalidValue(f"{what} must be 64 lowercase hex digits")
    return value


@dataclass(frozen=True)
class ReleaseManifest:
    """What devices serve now (module docstring). ``stages[stage]`` is the cohort's fraction,
    ``cohort`` its exact bound (``cohort_bound``)."""

    fleet: str
    seq: int
    version: int
    sha256: str
    previous: int | None
    previous_sha256: str
    stage: int
    stages: tuple[float, ...]
    cohort: int
    mode: ReleaseMode
    max_regression: float
    issued: float
    signature: bytes = b""

    def __post_init__(self) -> None:
        validate_device_id(self.fleet)  # fleet names follow the device-id rule (fedge.topics)
        _sha(self.sha256, "sha256")
        if self.previous is not None:
            _sha(self.previous_sha256, "previous_sha256")
        elif self.previous_sha256:
            raise InvalidValue("previous_sha256 without previous")
        if not 1 <= len(self.stages) <= MAX_STAGES or not 0 <= self.stage < len(self.stages):
            raise InvalidValue(f"stage {self.stage} of {len(self.stages)} stages")
        if any(not 0 < s <= 1 for s in self.stages) or list(self.stages) != sorted(self.stages):
            raise InvalidValue(f"stages must rise within (0, 1], got {list(self.stages)}")
        if self.cohort != cohort_bound(self.stages[self.stage]):
            raise InvalidValue("cohort is not the bound of the stage's fraction")
        if not 0 < self.seq < 2**32 or not 0 <= self.version <= _MAX_ROUND:
            raise InvalidValue("seq or version out of range")
        if not (math.isfinite(self.max_regression) and self.max_regression >= 0):
            raise InvalidValue("max_regression must be finite and >= 0")

    @property
    def fraction(self) -> float:
        return self.stages[self.stage]

    def digest(self) -> bytes:
        return release_digest(self)

    def serves(self, device: str) -> int | None:
        """The version ``device`` should serve under this manifest."""
        return self.version if in_cohort(self.fleet, device, self.cohort) else self.previous

    def to_bytes(self) -> bytes:
        body: dict[str, Any] = {
            "v": SCHEMA_VERSION,
            "kind": str(Kind.RELEASE),
            "fleet": self.fleet,
            "seq": self.seq,
            "version": self.version,
            "sha256": self.sha256,
            "stage": self.stage,
            "stages": [float(s) for s in self.stages],
            "cohort": self.cohort,
            "mode": str(self.mode),
            "max_regression": float(self.max_regression),
            "issued": float(self.issued),
        }
        if self.previous is not None:
            body["previous"] = self.previous
            body["previous_sha256"] = self.previous_sha256
        if self.signature:
            body["signature"] = self.signature
        return pack(body)

    @classmethod
    def from_bytes(cls, payload: bytes, limits: Limits = DEFAULT_LIMITS) -> Self:
        f = _open(payload, Kind.RELEASE, limits)
        raw_stages = f._get("stages", False)
        if not isinstance(raw_stages, list) or not 1 <= len(raw_stages) <= MAX_STAGES:
            raise ProtocolError("schema", f"release.stages must be 1-{MAX_STAGES} numbers")
        st = Fields({str(i): x for i, x in enumerate(raw_stages)}, "release.stages", limits)
        stages = tuple(st.float(str(i), 0.0, 1.0) for i in range(len(raw_stages)))
        try:
            m = cls(
                fleet=f.str("fleet"),
                seq=f.int("seq", 1, 2**32 - 1),
                version=f.int("version", 0, _MAX_ROUND),
                sha256=f.str("sha256"),
                previous=f.int("previous", 0, _MAX_ROUND, optional=True),
                previous_sha256=f.str("previous_sha256", optional=True) or "",
                stage=f.int("stage", 0, MAX_STAGES - 1),
                stages=stages,
                cohort=f.int("cohort", 0, _U64 - 1),
                mode=ReleaseMode(f.str("mode", choices=tuple(x.value for x in ReleaseMode))),
                max_regression=f.float("max_regression", 0.0, 100.0),
                issued=f.float("issued", 0.0),
                signature=f.bytes("signature", max_len=SIGNATURE_BYTES, optional=True) or b"",
            )
        except InvalidValue as e:
            raise ProtocolError("schema", f"release: {e}") from None
        f.done()
        return m


@dataclass(frozen=True)
class ShadowReport:
    """A device's shadow evaluation of ``version`` (answering manifest ``seq``) on its local
    labelled hold-out, against ``baseline`` (what it served then; None: nothing). Accuracy in
    [0, 1], latency in ms per batch-1 sample; ``error`` names a failure to verify or load the
    candidate (then the metrics are 0); ``switched``: the device serves the candidate now."""

    seq: int
    version: int
    samples: int
    accuracy: float
    loss: float
    latency_ms: float
    baseline: int | None = None
    base_accuracy: float = 0.0
    base_loss: float = 0.0
    base_latency_ms: float = 0.0
    error: str = ""
    switched: bool = False

    @property
    def regression_pp(self) -> float:
        """Percentage points of accuracy lost against the baseline (negative: a gain)."""
        if self.baseline is None:
            return 0.0
        return 100.0 * (self.base_accuracy - self.accuracy)

    def to_map(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "seq": self.seq,
            "version": self.version,
            "n": self.samples,
            "acc": float(self.accuracy),
            "loss": float(self.loss),
            "ms": float(self.latency_ms),
            "switched": self.switched,
        }
        if self.baseline is not None:
            out |= {
                "base": self.baseline,
                "base_acc": float(self.base_accuracy),
                "base_loss": float(self.base_loss),
                "base_ms": float(self.base_latency_ms),
            }
        if self.error:
            out["error"] = self.error[:120]
        return out

    @classmethod
    def read(cls, raw: Any, limits: Limits) -> ShadowReport:
        if not isinstance(raw, dict):
            raise ProtocolError("schema", "status.shadow must be a map")
        f = Fields(raw, "status.shadow", limits)
        big = 1e9
        r = cls(
            seq=f.int("seq", 1, 2**32 - 1),
            version=f.int("version", 0, _MAX_ROUND),
            samples=f.int("n", 0, 2**31),
            accuracy=f.float("acc", 0.0, 1.0),
            loss=f.float("loss", 0.0, big),
            latency_ms=f.float("ms", 0.0, big),
            switched=f.bool("switched"),
            baseline=f.int("base", 0, _MAX_ROUND, optional=True),
            base_accuracy=f.float("base_acc", 0.0, 1.0, optional=True) or 0.0,
            base_loss=f.float("base_loss", 0.0, big, optional=True) or 0.0,
            base_latency_ms=f.float("base_ms", 0.0, big, optional=True) or 0.0,
            error=f.str("error", optional=True) or "",
        )
        f.done()
        return r
