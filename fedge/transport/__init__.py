"""The MQTT runtime every role shares: broker URLs and packet sizes (``mqtt``), one epoll loop
driving many paho clients (``mux``), a persistent MQTT 5 session (``session``); the seam the
roles see (``base``: ``RoleSession``, ``SessionRequest``, ``SessionFactory``, ``Loop``) and an
in-process broker for unit tests (``memory``); the start-up check that an MQTT broker answers
(``probe``)."""

__all__ = ["base", "memory", "mqtt", "mux", "probe", "session"]
