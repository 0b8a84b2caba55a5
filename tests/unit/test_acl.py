"""fedge_cli/pki/acl.py: the shipped ACLs pinned to one fleet."""

from __future__ import annotations

import pytest

from fedge.errors import InvalidValue
from fedge_cli.pki import render_acl
from fedge_cli.pki.acl import SHIPPED_ACLS


@pytest.mark.parametrize("name", ["acl", "acl.sharded"])
def test_every_topic_line_is_pinned_to_the_fleet(name: str) -> None:
    text = (SHIPPED_ACLS / name).read_text()

    pinned = render_acl(text, "plant7")

    rules = [ln for ln in pinned.splitlines() if ln.split()[:1] in (["pattern"], ["topic"])]
    assert rules
    assert all("fedge/plant7/" in ln for ln in rules), rules
    assert "pattern write fedge/plant7/update/%u" in pinned
    assert "topic readwrite fedge/plant7/#" in pinned
    # comments keep describing the template
    comments = [ln for ln in pinned.splitlines() if ln.startswith("#")]
    assert comments == [ln for ln in text.splitlines() if ln.startswith("#")]


@pytest.mark.parametrize("fleet", ["+", "#", "a/b", ""])
def test_a_fleet_must_be_one_plain_topic_level(fleet: str) -> None:
    with pytest.raises(InvalidValue):
        render_acl("pattern read fedge/+/model/#\n", fleet)
