"""Simulated device heterogeneity for ``fedge simulate``.

Two kinds of device heterogeneity can be simulated:

- **Stragglers** (``stragglers=p``), the systems-heterogeneity model of FedProx (Li et al.,
  MLSys 2020, section 5.1): in every round, each device that trains is a straggler with
  probability ``p``, drawn from the per-round seed the agent hands its train function
  (``device seed * 1_000_003 + round``), so a run is reproducible and the draws of different
  devices and rounds are independent. A straggler runs ``U{1..E}`` local epochs instead of E.
  With ``drop_stragglers=True`` it sends nothing instead (it missed the deadline: FedAvg in
  the paper drops such devices), so a sync round counts only the devices that made it.
- **Slow devices** (``device_delay=(lo, hi)``): device i gets a fixed extra compute time,
  log-spaced from ``lo`` to ``hi`` seconds over the fleet and assigned to devices by a seeded
  permutation; its training result is held back that long after its training finishes. The
  wait is a timer on the devices' mux, not a sleeping thread, so slow devices never hold up
  the training thread that fast ones share.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import CancelledError, Executor, Future
from typing import Any

import numpy as np

from fedge.transport.mux import Mux

__all__ = ["DelayedExecutor", "device_delays", "straggler_draw", "straggler_train"]


def straggler_draw(p: float, round_seed: int, epochs: int) -> int | None:
    """The local epochs of a device in a round: None if it is not a straggler (probability
    ``1 - p``), else ``U{1..epochs}``. Pure in ``round_seed`` (the agent's ``device seed *
    1_000_003 + round``), so a benchmark can recount afterwards which devices straggled."""
    rng = np.random.default_rng([round_seed % 2**63, 104729])
    if rng.random() >= p:
        return None
    return int(rng.integers(1, epochs + 1))


def straggler_train(p: float, *, drop: bool = False) -> Callable[..., Any]:
    """A train function for FedProx's straggler model (see :func:`straggler_draw`). With
    ``drop``, a straggler does no work and returns None: the agent then sends nothing."""
    from dataclasses import replace

    from edge_agent.trainer import train_local

    def train(arch: Any, weights: Any, x: Any, y: Any, hyper: Any, s: int, **kw: Any) -> Any:
        epochs = straggler_draw(p, s, hyper.epochs)
        if epochs is None:
            return train_local(arch, weights, x, y, hyper, s, **kw)
        if drop:
            return None
        return train_local(arch, weights, x, y, replace(hyper, epochs=epochs), s, **kw)

    return train


def device_delays(spread: tuple[float, float] | None, devices: int, seed: int) -> list[float]:
    """Per-device extra compute seconds: ``devices`` values log-spaced over ``spread``
    (exactly ``hi / lo`` between the fastest and the slowest device), shuffled by ``seed``."""
    if spread is None:
        return []
    lo, hi = spread
    if devices == 1 or lo == hi:
        grid = np.full(devices, float(lo))
    elif lo == 0:
        grid = np.linspace(0.0, hi, devices)
    else:
        grid = np.geomspace(lo, hi, devices)
    return [float(d) for d in np.random.default_rng([seed, 15485863]).permutation(grid)]


class DelayedExecutor(Executor):
    """Run on ``inner`` (the shared training thread), then hold the result ``delay`` seconds
    on ``mux``'s timers before completing the returned future: a device that computes slower
    than this machine, without a thread asleep that the other devices would queue behind."""

    def __init__(self, inner: Executor, mux: Mux, delay: float) -> None:
        self.inner, self.mux, self.delay = inner, mux, delay

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        outer: Future[Any] = Future()
        outer.set_running_or_notify_cancel()

        def complete(f: Future[Any]) -> None:
            exc = CancelledError() if f.cancelled() else f.exception()
            if exc is not None:
                outer.set_exception(exc)
            else:
                outer.set_result(f.result())

        def trained(f: Future[Any]) -> None:
            # mux.call_later is for the mux thread: hop there first.
            self.mux.call_soon(lambda: self.mux.call_later(self.delay, lambda: complete(f)))

        self.inner.submit(fn, *args, **kwargs).add_done_callback(trained)
        return outer
