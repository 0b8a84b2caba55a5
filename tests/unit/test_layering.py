"""The layering of the house, checked from the imports themselves (docs/architecture.md).

Every ``import`` and ``from ... import`` in a package's modules counts, those inside functions
too (a lazy import is still a dependency). The rules:

- the two roles never import each other: ``edge_agent`` ↛ ``aggregator`` and back;
- the contract (``fedge``) imports no role, no model code, and nothing from the top layer;
  its wire modules do not depend on the MQTT runtime (``fedge.transport``) either;
- ``models`` imports nothing of the messages (no envelope, wire, topic, codec or transport);
- strategies import nothing outside ``aggregator.strategies`` but the standard library,
  numpy (and ``dp_accounting``, DP-FedAvg's accountant) and the contract's pure helpers
  (errors, tensors, clipping);
- nothing under the top layer (``fedge_cli``, ``simulation``) is imported from below it.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("fedge", "models", "edge_agent", "aggregator", "simulation", "fedge_cli")
TOP = ("simulation", "fedge_cli")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path = ROOT) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    here = module_name(path, root).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            yield mod, node.lineno
            for alias in node.names:  # ``from fedge import envelopes`` imports a module
                yield f"{mod}.{alias.name}", node.lineno


def modules_under(prefix: str, root: Path = ROOT) -> list[Path]:
    folder = root.joinpath(*prefix.split("."))
    return sorted(folder.rglob("*.py")) if folder.is_dir() else [folder.with_suffix(".py")]


def violations(prefix: str, allowed: Callable[[str], bool], root: Path = ROOT) -> list[str]:
    """``file:line imports X`` for each import of ``prefix``'s modules that ``allowed`` refuses."""
    out = []
    for path in modules_under(prefix, root):
        for mod, line in imports_of(path, root):
            if not allowed(mod):
                out.append(f"{path.relative_to(root)}:{line} imports {mod}")
    return sorted(set(out))


def within(mod: str, *prefixes: str) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def first_party(mod: str) -> bool:
    return within(mod, *PACKAGES)


def test_the_roles_never_import_each_other() -> None:
    assert violations("edge_agent", lambda m: not within(m, "aggregator")) == []
    assert violations("aggregator", lambda m: not within(m, "edge_agent")) == []


def test_the_contract_imports_no_role_no_model_and_no_top_layer() -> None:
    assert violations("fedge", lambda m: not first_party(m) or within(m, "fedge")) == []


def test_the_wire_modules_do_not_depend_on_the_mqtt_runtime() -> None:
    wire = [p for p in modules_under("fedge") if "transport" not in p.relative_to(ROOT).parts]
    bad = [
        f"{p.relative_to(ROOT)}:{line} imports {mod}"
        for p in wire
        if "support" not in p.relative_to(ROOT).parts
        for mod, line in imports_of(p)
        if within(mod, "fedge.transport")
    ]
    assert bad == []


def test_models_import_nothing_of_the_messages_and_no_role() -> None:
    def allowed(m: str) -> bool:
        return not first_party(m) or within(m, "models", "fedge.errors", "fedge.support")

    assert violations("models", allowed) == []


def test_strategies_import_only_numpy_and_the_contracts_pure_helpers() -> None:
    stdlib = set(sys.stdlib_module_names)

    def allowed(m: str) -> bool:
        top = m.split(".")[0]
        return (
            top in stdlib
            or top in ("numpy", "dp_accounting")  # dp_accounting: DP-FedAvg's epsilon
            or m == "__future__"
            or within(m, "aggregator.strategies", "fedge.errors", "fedge.tensors", "fedge.clipping")
        )

    assert violations("aggregator.strategies", allowed) == []


@pytest.mark.parametrize("package", ["fedge", "models", "edge_agent", "aggregator"])
def test_nothing_below_the_top_layer_imports_it(package: str) -> None:
    assert violations(package, lambda m: not within(m, *TOP)) == []


def test_the_checker_sees_a_violation_when_there_is_one(tmp_path: Path) -> None:
    # The rules above pass on the tree; this shows the checker would notice a breach, a lazy
    # and a relative import included.
    (tmp_path / "edge_agent").mkdir()
    (tmp_path / "edge_agent" / "__init__.py").write_text("from . import _layering_probe\n")
    bad = tmp_path / "edge_agent" / "_layering_probe.py"
    bad.write_text("def f() -> None:\n    from aggregator.service import Aggregator\n")

    found = violations("edge_agent", lambda m: not within(m, "aggregator"), tmp_path)
    relative = list(imports_of(tmp_path / "edge_agent" / "__init__.py", tmp_path))

    assert ("edge_agent._layering_probe", 1) in relative
    assert found == [
        "edge_agent/_layering_probe.py:2 imports aggregator.service",
        "edge_agent/_layering_probe.py:2 imports aggregator.service.Aggregator",
    ]
