"""The seeded draws behind simulated stragglers and slow devices (simulation.fleet)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from fedge.transport.mux import Mux
from simulation.fleet import DelayedExecutor, device_delays, straggler_draw


def test_straggler_draw_is_a_straggler_with_probability_p_and_runs_1_to_e_epochs() -> None:
    draws = [
        straggler_draw(0.3, seed * 1_000_003 + rnd, 20) for seed in range(50) for rnd in range(40)
    ]

    stragglers = [d for d in draws if d is not None]
    assert len(stragglers) / len(draws) == pytest.approx(0.3, abs=0.03)
    assert min(stragglers) == 1
    assert max(stragglers) == 20


def test_straggler_draw_is_pure_in_the_round_seed() -> None:
    assert [straggler_draw(0.5, s, 20) for s in range(100)] == [
        straggler_draw(0.5, s, 20) for s in range(100)
    ]
    assert all(straggler_draw(0.0, s, 20) is None for s in range(100))
    assert all(straggler_draw(1.0, s, 20) is not None for s in range(100))


def test_device_delays_span_exactly_the_range_log_spaced_and_seeded() -> None:
    d = device_delays((0.5, 5.0), 20, seed=3)

    assert len(d) == 20
    np.testing.assert_allclose(sorted(d), np.geomspace(0.5, 5.0, 20))
    assert d == device_delays((0.5, 5.0), 20, seed=3)
    assert d != device_delays((0.5, 5.0), 20, seed=4)
    assert device_delays(None, 20, seed=3) == []


def test_delayed_executor_completes_after_the_delay_with_the_result() -> None:
    mux = Mux("test-delay").start()
    inner = ThreadPoolExecutor(1)
    try:
        t0 = time.monotonic()
        fut = DelayedExecutor(inner, mux, 0.2).submit(lambda a, b: a + b, 2, 3)
        boom = DelayedExecutor(inner, mux, 0.0).submit(lambda: 1 / 0)

        assert fut.result(timeout=10) == 5
        assert time.monotonic() - t0 >= 0.2  # a lower bound: timers never fire early
        with pytest.raises(ZeroDivisionError):
            boom.result(timeout=10)
    finally:
        inner.shutdown()
        mux.stop()
