from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from aggregator.selection import round_target, select_clients

FLEET = [f"dev-{i:03d}" for i in range(40)]


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_same_seed_same_selection_whatever_the_input_order() -> None:
    online = set(FLEET)

    a = select_clients(FLEET, online, count=10, rng=rng(7))
    b = select_clients(list(reversed(FLEET)), frozenset(online), count=10, rng=rng(7))

    assert a == b
    assert list(a) == sorted(a)
    assert len(set(a)) == 10


def test_different_seeds_give_different_selections() -> None:
    picks = {select_clients(FLEET, set(FLEET), count=10, rng=rng(s)) for s in range(5)}

    assert len(picks) == 5


def test_offline_devices_are_never_selected() -> None:
    online = set(FLEET[::2])

    for seed in range(20):
        chosen = select_clients(FLEET, online, count=15, rng=rng(seed))
        assert set(chosen) <= online
        assert len(chosen) == 15


def test_fraction_is_of_the_whole_fleet_rounded_up() -> None:
    online = set(FLEET[:30])

    chosen = select_clients(FLEET, online, fraction=0.26, rng=rng())

    assert len(chosen) == math.ceil(0.26 * 40) == 11
    assert round_target(40, fraction=0.26) == 11


def test_over_selection_asks_extra_devices_but_the_target_stays() -> None:
    chosen = select_clients(FLEET, set(FLEET), count=10, over_select=0.25, rng=rng())

    assert len(chosen) == 13  # ceil(10 * 1.25) = 12.5 -> 13
    assert len(select_clients(FLEET, set(FLEET), count=10, over_select=0.1, rng=rng())) == 11
    assert round_target(40, count=10) == 10


def test_never_more_than_are_online() -> None:
    online = set(FLEET[:6])

    chosen = select_clients(FLEET, online, count=10, over_select=0.5, rng=rng())

    assert chosen == tuple(sorted(online))
    assert select_clients(FLEET, set(), count=3, rng=rng()) == ()


def test_without_fraction_or_count_every_online_device_is_asked() -> None:
    online = {"dev-001", "dev-005", "not-in-fleet"}

    assert select_clients(FLEET, online, rng=rng()) == ("dev-001", "dev-005")


def test_selection_is_uniform_over_online_devices() -> None:
    online = set(FLEET[:20])
    g = rng(3)
    counts: Counter[str] = Counter()

    for _ in range(2000):
        counts.update(select_clients(FLEET, online, count=5, rng=g))

    # Each online device is asked with probability 5/20: 500 of 2000 draws, sd ~19.4.
    assert set(counts) == online
    assert all(420 < c < 580 for c in counts.values())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fraction": 0.5, "count": 3}, "either fraction or count"),
        ({"fraction": 0.0}, "fraction must be in"),
        ({"fraction": 1.5}, "fraction must be in"),
        ({"count": 0}, "count must be an integer >= 1"),
        ({"count": 2, "over_select": -0.1}, "over_select"),
        ({"count": 2, "over_select": math.inf}, "over_select"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        select_clients(FLEET, set(FLEET), rng=rng(), **kwargs)
