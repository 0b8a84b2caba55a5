"""fedge_cli: the ``fedge`` command (``main``), the top of the house: nothing imports it."""

__all__ = ["main"]
