"""docs/protocol.md §16.7 carries exactly what fedge's encoder prints for its examples."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_protocol_examples_match_the_encoder() -> None:
    spec = importlib.util.spec_from_file_location(
        "secagg_bytes", ROOT / "docs/examples/secagg_bytes.py"
    )
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = (ROOT / "docs/protocol.md").read_text()
    assert f"```\n{mod.examples()}```" in text
