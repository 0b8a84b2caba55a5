"""The identity package's public surface: fedge_cli.pki exports the work, admin only the CLI."""

from __future__ import annotations

import importlib
import pkgutil

from fedge_cli import admin, pki


def test_admin_is_the_command_line_only() -> None:
    assert admin.__all__ == ["add_arguments"]


def test_pki_exports_resolve_and_every_module_declares_all() -> None:
    # Prepare
    modules = [
        importlib.import_module(f"fedge_cli.pki.{m.name}")
        for m in pkgutil.iter_modules(pki.__path__)
    ]
    # Assert
    assert {"CaDir", "enroll", "revoke", "init_ca", "write_crl", "render_broker_config"} <= set(
        pki.__all__
    )
    assert all(hasattr(pki, name) for name in pki.__all__)
    for module in modules:
        assert all(hasattr(module, name) for name in module.__all__), module.__name__
