"""The live view of a service: Prometheus metrics, the fleet snapshot and the dashboard.

``fleetview`` keeps what the dashboard shows and makes immutable snapshots of it;
``prometheus`` is the Prometheus sink and the gauges; ``server`` serves ``/metrics``,
``/api/fleet`` and ``/`` (``dashboard.html``) from a thread of its own."""
