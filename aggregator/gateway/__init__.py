"""The gateway tier: one aggregator per site, on the site's own broker, bridged to the centre.

A site gateway (``site``) is a shard worker whose share is its site's devices: it takes their
updates through the shared intake (checks, fsynced journal, local receipts) into one partial
sum, and answers the central aggregator's requests over Mosquitto's bridge with summaries
until the seal, then with its one dense partial of the round; when the round closed without
it (the site was cut off) it tells its devices with late receipts. ``settings`` is its
``gateway.yaml``; ``cli`` is ``fedge gateway``.

The CLI and the simulation may import the modules listed below; the rest are the wing's own."""

__all__ = ["cli", "settings", "site"]
