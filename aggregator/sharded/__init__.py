"""The sharding wing: shard workers on an MQTT 5 shared subscription take updates through the
shared intake and fold partial sums (``worker``, configured by ``settings``); the reducer
merges them (``reducer``); the service runs as the reducer through its round mode (``mode``)
and its poll-and-seal bookkeeping (``rounds``); worker processes and a standalone reducer
session (``service``, ``fedge shard-worker``); their messages (``partials``).

The CLI and the simulation may import the modules listed below; the rest are the wing's own."""

__all__ = ["service", "settings", "worker"]
