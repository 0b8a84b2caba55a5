"""Every MQTT topic of a fleet, built and parsed in one place.

``{p}`` is the fleet prefix, ``fedge/<fleet>``:

    {p}/model/global      retained, QoS 1   aggregator -> devices   GlobalModel
    {p}/model/chunk/{i}   retained, QoS 1   aggregator -> devices   ModelChunk (large models)
    {p}/model/int8        retained, QoS 1   aggregator -> devices   GlobalModel (int8 QDQ ONNX)
    {p}/model/patch/{s}   retained, QoS 1   aggregator -> devices   ModelPatch to version v, in
                                                                    slot s = v mod patch_retain
    {p}/round/current     retained, QoS 1   aggregator -> devices   RoundTask
    {p}/update/{device}   QoS 1             device -> aggregator    ModelUpdate
    {p}/status/{device}   retained, QoS 1   device -> all           DeviceStatus (also the will)
    {p}/receipt/{device}  QoS 1             aggregator -> device    Receipt (update recorded)
    {p}/release           retained, QoS 1   aggregator -> devices   ReleaseManifest (serving)
    {p}/release/candidate retained, QoS 1   aggregator -> devices   GlobalModel (manifest's version)
    {p}/release/stable    retained, QoS 1   aggregator -> devices   GlobalModel (its previous)

Secure rounds (``fedge.secagg``, protocol §16):

    {p}/secagg/stage             retained, QoS 1   aggregator -> devices   Open, Roster, Unmask
    {p}/inbox/{device}           QoS 1             aggregator -> device    Inbox (sealed shares)
    {p}/secagg/{stage}/{device}  QoS 1             device -> aggregator    advertise, shares,
                                                                           masked, reply
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fedge.errors import InvalidValue

__all__ = ["SECAGG_STAGES", "Topics", "validate_device_id"]

# What a device sends in a secure round, one topic level each (fedge.secagg.messages).
SECAGG_STAGES = ("advertise", "shares", "masked", "reply")

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def validate_device_id(device_id: str) -> str:
    """Device ids become topic levels and client ids: no wildcards, slashes or spaces.

    ``InvalidValue`` (a ``ValueError`` too, for pydantic validators) says what to write.
    """
    if not isinstance(device_id, str) or not _ID.fullmatch(device_id):
        raise InvalidValue(
            f"invalid device id {device_id!r}: use 1-64 characters of letters, digits, '_', '.', "
            "'-', starting with a letter or digit"
        )
    return device_id


@dataclass(frozen=True)
class Topics:
    """Topic names of one fleet."""

    fleet: str = "default"

    def __post_init__(self) -> None:
        try:
            validate_device_id(self.fleet)
        except InvalidValue:
            raise InvalidValue(
                f"invalid fleet name {self.fleet!r}: use letters, digits, '_', '.', '-'"
            ) from None

    @property
    def prefix(self) -> str:
        return f"fedge/{self.fleet}"

    @property
    def model(self) -> str:
        return f"{self.prefix}/model/global"

    @property
    def model_int8(self) -> str:
        return f"{self.prefix}/model/int8"

    def model_chunk(self, index: int) -> str:
        return f"{self.prefix}/model/chunk/{int(index)}"

    @property
    def all_model_chunks(self) -> str:
        return f"{self.prefix}/model/chunk/+"

    def model_patch(self, slot: int) -> str:
        """The retained slot ``to_version mod patch_retain`` (protocol §5.9)."""
        return f"{self.prefix}/model/patch/{int(slot)}"

    @property
    def all_model_patches(self) -> str:
        return f"{self.prefix}/model/patch/+"

    @property
    def release(self) -> str:
        return f"{self.prefix}/release"

    @property
    def release_candidate(self) -> str:
        return f"{self.prefix}/release/candidate"

    @property
    def release_stable(self) -> str:
        return f"{self.prefix}/release/stable"

    @property
    def task(self) -> str:
        return f"{self.prefix}/round/current"

    def update(self, device: str) -> str:
        return f"{self.prefix}/update/{validate_device_id(device)}"

    def receipt(self, device: str) -> str:
        return f"{self.prefix}/receipt/{validate_device_id(device)}"

    def status(self, device: str) -> str:
        return f"{self.prefix}/status/{validate_device_id(device)}"

    @property
    def all_updates(self) -> str:
        return f"{self.prefix}/update/+"

    @property
    def all_statuses(self) -> str:
        return f"{self.prefix}/status/+"

    @property
    def secagg_stage(self) -> str:
        return f"{self.prefix}/secagg/stage"

    def secagg(self, stage: str, device: str) -> str:
        if stage not in SECAGG_STAGES:
            raise InvalidValue(f"unknown secagg stage {stage!r}")
        return f"{self.prefix}/secagg/{stage}/{validate_device_id(device)}"

    @property
    def all_secagg(self) -> str:
        """What devices send in secure rounds (the stage topic has one level less)."""
        return f"{self.prefix}/secagg/+/+"

    def inbox(self, device: str) -> str:
        return f"{self.prefix}/inbox/{validate_device_id(device)}"

    def device_of(self, topic: str, kind: str) -> str | None:
        """The device id in ``{p}/{kind}/{device}``, or None if the topic is not of that form."""
        head = f"{self.prefix}/{kind}/"
        if not topic.startswith(head):
            return None
        device = topic[len(head) :]
        return device if _ID.fullmatch(device) else None
