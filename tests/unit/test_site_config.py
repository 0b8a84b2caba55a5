"""The site bridge profiles of broker_config/: the loopback one and the production one map
the same topics the same way, and the map is the one docs/protocol.md describes."""

from __future__ import annotations

from fedge.support.shipped import broker_config_dir


def _lines(name: str, key: str) -> list[str]:
    text = (broker_config_dir() / name).read_text()
    return [ln.strip() for ln in text.splitlines() if ln.strip().split()[:1] == [key]]


def test_the_loopback_and_production_bridges_map_the_same_topics() -> None:
    for key in ("topic", "notification_topic", "bridge_protocol_version", "cleansession"):
        assert _lines("site.conf.template", key) == _lines("bridge.conf", key), key


def test_the_control_plane_comes_in_and_only_partials_and_statuses_go_out() -> None:
    topics = {ln.split()[1]: ln.split()[2] for ln in _lines("site.conf.template", "topic")}
    assert topics == {
        "fedge/{fleet}/model/#": "in",
        "fedge/{fleet}/round/#": "in",
        "fedge/{fleet}/release/#": "in",
        "fedge/{fleet}/partial/gw-{site}": "out",
        "fedge/{fleet}/status/#": "out",
    }
    # Device updates and receipts are in no line: they stay on the site broker.
    assert not [t for t in topics if "update" in t or "receipt" in t]
