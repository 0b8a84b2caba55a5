"""Utilities under the roles: YAML config loading, atomic file writes, signal handling,
fault-injection points."""

__all__ = ["config_io", "faults", "fsutil", "runtime", "shipped"]
