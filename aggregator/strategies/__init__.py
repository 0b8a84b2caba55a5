"""Aggregation strategies, one per module over a small base, looked up by name.

``make_strategy("fedadam", {"tau": "1e-3"})`` builds one from ``KEY=VALUE`` options;
``describe_strategies()`` lists every strategy with its options and defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from aggregator.strategies.base import StateDict, Strategy, update_norm
from aggregator.strategies.dp_fedavg import DPFedAvg
from aggregator.strategies.fedadagrad import FedAdagrad
from aggregator.strategies.fedadam import FedAdam
from aggregator.strategies.fedavg import FedAvg
from aggregator.strategies.fedavgm import FedAvgM
from aggregator.strategies.fedprox import FedProx
from aggregator.strategies.fedyogi import FedYogi
from aggregator.strategies.krum import Krum, MultiKrum
from aggregator.strategies.median import Median
from aggregator.strategies.options import OptionInfo, build_options, describe_options
from aggregator.strategies.options import parse_option_pairs as parse_option_pairs
from aggregator.strategies.trimmed_mean import TrimmedMean
from fedge.errors import InvalidValue

__all__ = [
    "STRATEGIES",
    "OptionInfo",
    "StateDict",
    "Strategy",
    "StrategyInfo",
    "describe_strategies",
    "make_strategy",
    "parse_option_pairs",
    "update_norm",
]

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        FedAvg,
        FedAvgM,
        FedProx,
        FedAdam,
        FedYogi,
        FedAdagrad,
        Median,
        TrimmedMean,
        Krum,
        MultiKrum,
        DPFedAvg,
    )
}


class StrategyInfo(NamedTuple):
    name: str
    summary: str
    options: tuple[OptionInfo, ...]


def make_strategy(
    name: str,
    options: Mapping[str, Any] | float | None = None,
    *,
    server_lr: float | None = None,
    target_devices: int | None = None,
) -> Strategy:
    """A strategy by name with typed options from ``KEY=VALUE`` strings (or YAML scalars).

    ``server_lr`` is a default that an explicit ``server_lr`` option overrides; ``None`` keeps
    the strategy's own default (1.0, but 1e-2 for the adaptive ones and 0.1 for fedavgm).
    ``target_devices`` fills the options that follow the round's target
    (``Strategy.round_defaults``) where not given explicitly.
    A bare number in place of ``options`` is taken as ``server_lr`` (the old signature).
    ``InvalidValue`` names the valid strategies or options.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in STRATEGIES:
        raise InvalidValue(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}")
    raw: dict[str, Any] = {}
    if isinstance(options, int | float) and not isinstance(options, bool):
        server_lr = float(options)
    elif isinstance(options, Mapping):
        raw.update(options)
    elif options is not None:
        raise TypeError(f"strategy options must be a mapping of KEY -> VALUE, got {options!r}")
    if server_lr is not None and "server_lr" not in raw:
        raw["server_lr"] = server_lr
    cls = STRATEGIES[key]
    if target_devices is not None:
        for k, v in cls.round_defaults(target_devices).items():
            raw.setdefault(k, v)
    return cls(build_options(cls.Options, key, raw))


def describe_strategies() -> list[StrategyInfo]:
    """``(name, summary, options)`` for every strategy; options carry defaults and help."""
    return [StrategyInfo(n, c.summary, describe_options(c.Options)) for n, c in STRATEGIES.items()]
