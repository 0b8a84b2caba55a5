"""fedge_cli/pki/acl.py: the shipped ACLs pinned to one fleet."""

from __future__ import annotations

import pytest

from fedge.errors import InvalidValue
from fedge_cli.pki import render_acl
from fedge_cli.pki.acl import SHIPPED_ACLS, acl_users, render_fleet_block


@pytest.mark.parametrize("name", ["acl", "acl.sharded"])
def test_every_topic_line_is_pinned_to_the_fleet(name: str) -> None:
    text = (SHIPPED_ACLS / name).read_text()

    pinned = render_acl(text, "plant7")

    rules = [ln for ln in pinned.splitlines() if ln.split()[:1] in (["pattern"], ["topic"])]
    grants = [ln for ln in rules if ln.split()[1] != "deny"]
    assert grants
    assert all("fedge/plant7/" in ln for ln in grants), grants
    # what a section is denied, it is denied under every fleet
    assert all("fedge/+/" in ln for ln in rules if ln.split()[1] == "deny")
    assert "pattern write fedge/plant7/update/%u" in pinned
    assert "topic readwrite fedge/plant7/#" in pinned
    # comments keep describing the template
    comments = [ln for ln in pinned.splitlines() if ln.startswith("#")]
    assert comments == [ln for ln in text.splitlines() if ln.startswith("#")]


@pytest.mark.parametrize("fleet", ["+", "#", "a/b", ""])
def test_a_fleet_must_be_one_plain_topic_level(fleet: str) -> None:
    with pytest.raises(InvalidValue):
        render_acl("pattern read fedge/+/model/#\n", fleet)


@pytest.mark.parametrize("name", ["acl", "acl.sharded"])
def test_a_fleet_block_renames_every_section_and_pins_it_to_its_fleet(name: str) -> None:
    text = (SHIPPED_ACLS / name).read_text()

    block = render_fleet_block(text, "b")

    assert acl_users(block) == {f"{u}.b" for u in acl_users(text)}
    lines = block.splitlines()
    assert "topic readwrite fedge/b/#" in lines  # aggregator.b: fleet b only
    assert "pattern write fedge/b/update/%u" in lines
    assert "topic deny fedge/+/status/monitor.b" in lines
    if name == "acl.sharded":
        assert "topic write fedge/b/partial/aggregator-0.b" in lines
    grants = [ln for ln in lines if ln.split()[:1] in (["pattern"], ["topic"])]
    assert all("fedge/b/" in ln or ln.split()[1] == "deny" for ln in grants), grants
