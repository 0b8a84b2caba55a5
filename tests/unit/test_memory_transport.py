"""The in-memory broker behaves as the roles expect of a broker (the subset they use)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from fedge.transport.base import SessionRequest
from fedge.transport.memory import ManualLoop, MemoryBroker, MemorySession, topic_matches


def client(
    broker: MemoryBroker,
    name: str,
    subs: list[str],
    handler: Callable[[str, bytes], None] | None = None,
    *,
    manual_ack: bool = False,
) -> tuple[MemorySession, list[tuple[str, bytes]]]:
    got: list[tuple[str, bytes]] = []

    def on_message(topic: str, payload: bytes) -> None:
        got.append((topic, payload))
        if handler is not None:
            handler(topic, payload)

    s = broker.session(SessionRequest(name, subs, on_message=on_message, manual_ack=manual_ack))
    s.start()
    return s, got


@pytest.mark.parametrize(
    ("filt", "topic", "match"),
    [
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a/b/d", False),
        ("a/#", "a/b/c", True),
        ("a/b", "a/b/c", False),
        ("$share/g/a/+", "a/x", True),
        ("a/+", "a", False),
    ],
)
def test_topic_filters(filt: str, topic: str, match: bool) -> None:
    assert topic_matches(filt, topic) is match


def test_retained_messages_reach_late_subscribers_and_an_empty_one_deletes() -> None:
    broker = MemoryBroker()
    pub, _ = client(broker, "pub", [])
    pub.publish("f/model", b"v1", retain=True)
    pub.publish("f/old", b"x", retain=True)
    pub.publish("f/old", b"", retain=True)

    _, got = client(broker, "late", ["f/#"])

    assert got == [("f/model", b"v1")]


def test_a_shared_subscription_hands_each_message_to_one_member() -> None:
    broker = MemoryBroker()
    _, got1 = client(broker, "w1", ["$share/g/f/update/+"])
    _, got2 = client(broker, "w2", ["$share/g/f/update/+"])
    pub, _ = client(broker, "dev", [])

    for i in range(4):
        pub.publish(f"f/update/d{i}", b"u")

    assert (len(got1), len(got2)) == (2, 2)


def test_a_failed_handler_gets_the_message_again_after_a_reconnect() -> None:
    broker = MemoryBroker()
    fail = [True]

    def handler(_t: str, _p: bytes) -> None:
        if fail[0]:
            raise OSError("disk full")

    sub, got = client(broker, "agg", ["f/update/+"], handler, manual_ack=True)
    pub, _ = client(broker, "dev", [])
    pub.publish("f/update/d", b"u1")
    fail[0] = False
    sub.drop()
    pub.publish("f/update/d", b"u2")  # queued for the persistent session
    sub.start()

    assert got == [("f/update/d", b"u1"), ("f/update/d", b"u1"), ("f/update/d", b"u2")]


def test_a_deferred_ack_keeps_the_message_until_acked() -> None:
    broker = MemoryBroker()
    acks: list[Callable[[], None]] = []
    sub: MemorySession | None = None

    def handler(_t: str, _p: bytes) -> None:
        assert sub is not None
        if len(acks) == 0:
            acks.append(sub.defer_ack())

    sub, got = client(broker, "w", ["f/u"], handler, manual_ack=True)
    pub, _ = client(broker, "dev", [])
    pub.publish("f/u", b"held")
    sub.drop()
    sub.start()  # not acked yet: delivered again
    acks[0]()
    sub.drop()
    sub.start()  # acked: not again

    assert got == [("f/u", b"held"), ("f/u", b"held")]


def test_defer_ack_outside_a_handler_is_an_error() -> None:
    s, _ = client(MemoryBroker(), "x", [], manual_ack=True)
    with pytest.raises(RuntimeError, match="outside a message handler"):
        s.defer_ack()


def test_the_will_is_published_on_a_lost_connection_not_on_close() -> None:
    broker = MemoryBroker()
    will = ("f/status/a", b"offline")
    a = broker.session(SessionRequest("a", [], on_message=lambda t, p: None, will=will))
    a.start()
    a.close(last=("f/status/a", b"bye"))
    assert broker.retained["f/status/a"] == b"bye"
    a.start()
    a.drop()
    assert broker.retained["f/status/a"] == b"offline"


def test_manual_loop_fires_due_timers_in_order_and_skips_cancelled_ones() -> None:
    loop, fired = ManualLoop(), []
    loop.call_later(2.0, lambda: fired.append("b"))
    loop.call_later(1.0, lambda: fired.append("a"))
    loop.call_later(1.5, lambda: fired.append("x")).cancel()
    loop.call_soon(fired.append, "soon")

    loop.advance(1.0)
    assert fired == ["soon", "a"]
    loop.advance(5.0)
    assert (fired, loop.now, loop.timers) == (["soon", "a", "b"], 6.0, 0)


def test_latest_only_topics_are_not_queued_for_an_absent_session() -> None:
    """As Mosquitto with a QoS 0 subscription: only the retained copy after reconnecting."""
    broker = MemoryBroker()
    pub, _ = client(broker, "pub", [])
    got: list[tuple[str, bytes]] = []
    request = SessionRequest(
        "dev",
        ["f/model", "f/receipt"],
        on_message=lambda t, p: got.append((t, p)),
        latest_only=["f/model"],
    )
    dev = broker.session(request)
    dev.start()
    dev.drop()  # away, the session persists
    for v in (b"v1", b"v2", b"v3"):
        pub.publish("f/model", v, retain=True)
    pub.publish("f/receipt", b"r1")
    got.clear()

    broker.session(request).start()

    assert sorted(got) == [("f/model", b"v3"), ("f/receipt", b"r1")]
