"""Each package's ``__init__`` names what other packages may import from it; this pins them.

A package's face is its ``__all__``. For the roles and the contract it lists the *submodules*
other packages may import (``from fedge.envelopes import RoundTask`` needs ``envelopes`` in
``fedge.__all__``). Submodules, not re-exported names: ``import models`` or ``import
edge_agent`` must not pull torch into an inference-only device, so no ``__init__`` imports
its submodules. The faces are read from the source (no import), and every import that crosses
from one package into another, a lazy one inside a function included, must go through them.
A package that is one concept with a small API (``fedge.codecs``, ``aggregator.strategies``)
lists the names it exports instead, and other packages import those names from it. Tests and
benchmarks reach into internals on purpose and are not checked.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("fedge", "models", "edge_agent", "aggregator", "simulation", "fedge_cli")

FACES: dict[str, list[str]] = {
    "fedge": [
        "chunks", "clipping", "codecs", "envelopes", "errors", "identity", "key_registry",
        "limits", "masks", "patches", "release_check", "secagg", "support", "task_check",
        "tensors", "topics", "trainable", "transport", "wire",
    ],
    "fedge.secagg": [
        "client", "crypto", "envelope", "graph", "messages", "prg", "ring", "server", "shamir",
    ],
    "fedge.transport": ["base", "memory", "mqtt", "mux", "probe", "session"],
    "fedge.support": ["config_io", "faults", "fsutil", "runtime", "shipped"],
    "models": [
        "int8", "onnx_export", "onnx_weights", "qat", "shrink", "torch_state", "units", "zoo",
    ],
    "edge_agent": [
        "agent", "cli", "config", "data", "inference", "model_cache", "secagg", "serving",
        "serving_store", "shadow", "store", "trainer", "uplink",
    ],
    "aggregator": [
        "cli", "config", "evaluation", "gateway", "keyring", "metrics", "prune_config",
        "rollout", "rollout_requests", "rollout_state", "service", "sharded", "strategies",
    ],
    "aggregator.gateway": ["cli", "settings", "site"],
    "aggregator.sharded": ["service", "settings", "worker"],
    "simulation": [
        "DEFAULT_DOWNLINK_CODEC", "DEFAULT_SIM_CODEC", "broker", "datasets", "default_codec",
        "fleet", "keys", "partition", "synthetic",
    ],
    "fedge_cli": ["main"],
}  # fmt: skip


def declared_all(package: str) -> list[str] | None:
    """The literal ``__all__`` of ``package/__init__.py``, or None if it has none."""
    init = ROOT.joinpath(*package.split("."), "__init__.py")
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return [ast.literal_eval(e) for e in node.value.elts]  # type: ignore[attr-defined]
    return None


def is_package(dotted: str) -> bool:
    return ROOT.joinpath(*dotted.split("."), "__init__.py").is_file()


def crossing_imports() -> list[tuple[str, str, int]]:
    """(importing file, imported dotted name, line) for imports from one package into another."""
    out = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [f"{node.module}.{a.name}" for a in node.names]
                else:
                    continue
                for name in names:
                    if name.split(".")[0] in PACKAGES and name.split(".")[0] != package:
                        out.append((str(path.relative_to(ROOT)), name, node.lineno))
    return out


def face_problem(name: str) -> str | None:
    """Why importing the dotted ``name`` from another package is not through a face."""
    parts = name.split(".")
    for depth in range(1, len(parts)):
        package, member = ".".join(parts[:depth]), parts[depth]
        if not is_package(package):
            return None  # past the modules: a class or function of a public module
        face = FACES.get(package) or declared_all(package)
        if face is None:
            return f"{package} has no face (add it to FACES and its __init__'s __all__)"
        if member not in face:
            return f"{member!r} is not in {package}.__all__"
    return None


@pytest.mark.parametrize("package", sorted(FACES))
def test_each_package_declares_its_face(package: str) -> None:
    assert declared_all(package) == FACES[package]


@pytest.mark.parametrize("package", ["fedge.codecs", "fedge.envelopes", "aggregator.strategies"])
def test_single_concept_packages_export_names(package: str) -> None:
    names = declared_all(package)

    assert names, f"{package} declares no __all__"
    assert not any(is_package(f"{package}.{n}") for n in names)


@pytest.mark.parametrize("package", sorted(FACES))
def test_every_name_in_a_face_exists(package: str) -> None:
    folder = ROOT.joinpath(*package.split("."))
    init = (folder / "__init__.py").read_text()
    for name in FACES[package]:
        exists = (folder / f"{name}.py").is_file() or (folder / name / "__init__.py").is_file()
        defined = f"{name} =" in init or f"def {name}(" in init
        assert exists or defined, f"{package}.{name} does not exist"


def test_imports_between_packages_go_through_the_faces() -> None:
    bad = [
        f"{path}:{line} imports {name}: {problem}"
        for path, name, line in crossing_imports()
        if (problem := face_problem(name))
    ]
    assert bad == []


def test_the_check_refuses_a_private_module() -> None:
    assert face_problem("aggregator.journal.RoundJournal") == (
        "'journal' is not in aggregator.__all__"
    )
    assert face_problem("aggregator.sharded.reducer") == (
        "'reducer' is not in aggregator.sharded.__all__"
    )
    assert face_problem("fedge.envelopes.RoundTask") is None
    assert face_problem("aggregator.strategies.describe_strategies") is None
    assert face_problem("aggregator.strategies.krum") == (
        "'krum' is not in aggregator.strategies.__all__"
    )
