"""Sharded aggregation: shard workers on an MQTT 5 shared subscription fold partial sums
(``worker``), the reducer merges them (``reducer``), the service drives it as a reducer
(``rounds``), processes and the worker command (``service``), and their messages (``partials``)."""
