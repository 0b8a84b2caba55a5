"""Files shipped beside the code: ``broker_config/`` (Mosquitto templates, ACLs).

In a checkout it is the top-level ``broker_config/``; a wheel carries the same files as the
package data ``fedge/broker_config/`` (pyproject's ``package-dir``), because an installed
package has no checkout to look in.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["broker_config_dir"]

_FEDGE = Path(__file__).resolve().parents[1]


def broker_config_dir() -> Path:
    """The directory holding ``local.conf.template``, ``production.conf``, ``acl`` …"""
    installed = _FEDGE / "broker_config"
    if installed.is_dir():
        return installed
    return _FEDGE.parent / "broker_config"
