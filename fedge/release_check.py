"""What a device checks on a release manifest before it lets it change what it serves.

A manifest decides which model answers a device's inference, so a forged one could make a
fleet serve anything: a device that holds the aggregator's key takes only manifests signed
by it over every field (``fedge.envelopes.release.release_digest``), for its own fleet, and
with a ``seq`` above the one it holds (a replayed or stale retained manifest, even a
genuinely signed one, never moves it back). The same manifest again (same ``seq``, same
signature: the retained copy re-delivered at a reconnect) is not an error: ``None``.
"""

from __future__ import annotations

from fedge.envelopes import ReleaseManifest
from fedge.errors import ProtocolError
from fedge.identity import VerifyKey

__all__ = ["check_release"]


def check_release(
    m: ReleaseManifest, key: VerifyKey | None, fleet: str, held: ReleaseManifest | None
) -> ReleaseManifest | None:
    """``m`` if it may be acted on, None if it is the manifest held; ``ProtocolError``
    (``unsigned_release``, ``bad_signature``, ``wrong_fleet``, ``stale_release``) if not."""
    if key is not None:
        if not m.signature:
            raise ProtocolError("unsigned_release", f"release seq {m.seq}: not signed")
        if not key.verify(m.digest(), m.signature):
            raise ProtocolError("bad_signature", f"release seq {m.seq}: signature is bad")
    if m.fleet != fleet:
        raise ProtocolError("wrong_fleet", f"release seq {m.seq} is for fleet {m.fleet!r}")
    if held is not None:
        if m.seq == held.seq and m.digest() == held.digest():
            return None
        if m.seq <= held.seq:
            raise ProtocolError(
                "stale_release", f"release seq {m.seq} is not above the held seq {held.seq}"
            )
    return m
