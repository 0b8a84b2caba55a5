"""``fedge report RUN_DIR [RUN_DIR...] --out PNG``: plot runs side by side.

Reads each run directory written by ``fedge simulate`` (``summary.json`` and
``metrics.jsonl``; the Flower side of ``bench/vs_flower`` writes the same two files), or a real
deployment's ``metrics.jsonl`` (the aggregator's ``state_dir``, or the file itself), and draws
one PNG with two panels: central accuracy against rounds, and against cumulative uplink bytes
(log scale), one line per run. When a run's summary carries the downlink too (``fedge
simulate``'s ``downlink_curve``: bytes the devices received per version), a third panel draws
accuracy against cumulative total bytes, uplink + downlink (runs without it are left out of
that panel). A run is labelled by the settings in which the runs differ
(``codec=int8+zstd``, ``framework=flower``...), the settings all share go in the title.

matplotlib is imported only when a report is drawn, so the rest of the command stays fast.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "RunSeries",
    "add_arguments",
    "load_run",
    "render_report",
    "render_series",
    "run",
    "run_labels",
]

# Settings that differ between any two runs without saying anything about them.
_NOT_A_SETTING = frozenset({"out", "broker", "metrics"})


@dataclass(frozen=True)
class RunSeries:
    """One run, ready to plot: the published rounds and what they cost."""

    path: Path
    config: dict[str, Any]
    rounds: tuple[int, ...]
    accuracy: tuple[float, ...]
    cumulative_uplink: tuple[int, ...]  # bytes received up to and including each round
    # Uplink + downlink up to and including each round; None: the run did not count its downlink.
    cumulative_total: tuple[int, ...] | None = None


def load_run(run_dir: Path) -> RunSeries:
    """Read one run: a ``fedge simulate --out`` directory (``summary.json`` and
    ``metrics.jsonl``), an aggregator's ``state_dir`` (``metrics.jsonl`` only: a deployment
    writes no summary; the run is then labelled by its directory) or a ``metrics.jsonl``."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        metrics_path, run_dir = run_dir, run_dir.parent
    else:
        metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise FileNotFoundError(
            f"{run_dir}: no metrics.jsonl; give a fedge simulate --out directory, an "
            "aggregator's state_dir or a metrics.jsonl file"
        )
    summary_path = run_dir / "summary.json"
    try:
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        records = [json.loads(s) for s in metrics_path.read_text().splitlines() if s.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{run_dir}: unreadable JSON ({e})") from None
    config = summary.get("config") if isinstance(summary, dict) else None
    down = _downlink_curve(summary, records)
    rounds: list[int] = []
    acc: list[float] = []
    cum: list[int] = []
    cum_total: list[int] = []
    total = downlink = versions = 0
    for r in records:
        # A failed round (no quorum) has no version and no accuracy, but its bytes were sent.
        total += int(r.get("uplink_bytes", 0))
        if down is not None and "version" in r:
            downlink += down[versions]  # what devices received by the time of this version
            versions += 1
        if r.get("accuracy") is None or r.get("round") is None:
            continue
        rounds.append(int(r["round"]))
        acc.append(float(r["accuracy"]))
        cum.append(total)
        cum_total.append(total + downlink)
    if not rounds:
        raise ValueError(f"{run_dir}: metrics.jsonl has no round with an accuracy")
    return RunSeries(
        run_dir,
        dict(config or {}),
        tuple(rounds),
        tuple(acc),
        tuple(cum),
        None if down is None else tuple(cum_total),
    )


def _downlink_curve(summary: Any, records: list[dict[str, Any]]) -> list[int] | None:
    """The summary's bytes down per version, if it has one entry per published version."""
    curve = summary.get("downlink_curve") if isinstance(summary, dict) else None
    if not isinstance(curve, list) or not all(
        isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in curve
    ):
        return None
    versions = sum(1 for r in records if "version" in r)
    return curve if len(curve) == versions and versions > 0 else None


def _settings(run: RunSeries) -> dict[str, str]:
    s = {k: str(v) for k, v in run.config.items() if k not in _NOT_A_SETTING}
    s.setdefault("framework", "fedge")
    return s


def _shorten(text: str, limit: int = 70) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def run_labels(runs: Sequence[RunSeries]) -> tuple[list[str], str]:
    """(one label per run from the settings that differ, a title from those all share)."""
    settings = [_settings(r) for r in runs]
    # Only settings every run has: fedge and Flower runs do not share all their knobs.
    keys = sorted(set.intersection(*(set(s) for s in settings)))
    differ = [k for k in keys if len({s[k] for s in settings}) > 1]
    shared = [k for k in keys if k not in differ]
    labels = []
    for r, s in zip(runs, settings, strict=True):
        text = ", ".join(f"{k}={s[k]}" for k in differ)
        labels.append(_shorten(text) if text else r.path.name)
    if len(set(labels)) < len(labels):  # same settings (e.g. repeats): tell them apart
        labels = [f"{lab} ({r.path.name})" for lab, r in zip(labels, runs, strict=True)]
    first = settings[0]
    wanted = ("framework", "dataset", "devices", "partition", "epochs", "lr", "codec")
    title = ", ".join(f"{k}={first[k]}" for k in wanted if k in shared)
    return labels, title


def render_report(
    run_dirs: Sequence[Path], out: Path, *, title: str | None = None, dpi: int = 100
) -> Path:
    """Draw the panels for ``run_dirs`` into the PNG ``out``; return its path."""
    if not run_dirs:
        raise ValueError("fedge report needs at least one run directory")
    runs = [load_run(Path(d)) for d in run_dirs]
    labels, shared = run_labels(runs)
    return render_series(
        runs, out, labels=labels, title=title if title is not None else shared, dpi=dpi
    )


def render_series(
    runs: Sequence[RunSeries],
    out: Path,
    *,
    labels: Sequence[str],
    title: str = "",
    dpi: int = 100,
) -> Path:
    """Draw accuracy against rounds, cumulative uplink bytes and, when any run has it,
    cumulative total bytes (12 x 4.8 inches, 18 x 4.8 with the third panel) into ``out``.
    For callers that build series themselves (``bench/bytes`` draws means over seeds)."""
    if not runs or len(labels) != len(runs):
        raise ValueError("render_series needs one label per run, and at least one run")
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: never needs a display
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter
    except ImportError:
        raise RuntimeError("fedge report needs matplotlib: pip install matplotlib") from None

    with_total = any(r.cumulative_total is not None for r in runs)
    panels = 3 if with_total else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.8), dpi=dpi, constrained_layout=True)
    ax_r, ax_b = axes[0], axes[1]
    try:
        for r, label in zip(runs, labels, strict=True):
            (line,) = ax_r.plot(r.rounds, r.accuracy, marker=".", label=label)
            ax_b.plot(r.cumulative_uplink, r.accuracy, marker=".", color=line.get_color())
            if with_total and r.cumulative_total is not None:
                axes[2].plot(r.cumulative_total, r.accuracy, marker=".", color=line.get_color())
        ax_r.set(xlabel="round", ylabel="central accuracy", title="accuracy vs rounds")
        ax_b.set(xlabel="cumulative uplink bytes", xscale="log", title="accuracy vs uplink bytes")
        if with_total:
            axes[2].set(
                xlabel="cumulative bytes, uplink + downlink",
                xscale="log",
                title="accuracy vs total bytes (both directions)",
            )
        for ax in axes:
            ax.grid(True, alpha=0.3)
        for ax in axes[1:]:  # log axes spanning under a decade label minor ticks: they overlap
            ax.xaxis.set_minor_formatter(NullFormatter())
        # As many columns as fit the figure's width (~70 characters a panel at this font size).
        ncols = max(1, min(len(runs), 70 * panels // max(len(lab) + 6 for lab in labels)))
        fig.legend(loc="outside lower center", ncols=ncols, fontsize="small")
        fig.suptitle(title)
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png")
    finally:
        plt.close(fig)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "run_dirs",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help="fedge simulate --out directory, aggregator state_dir, or metrics.jsonl",
    )
    p.add_argument("--out", type=Path, default=Path("report.png"), help="PNG to write")
    p.add_argument("--title", default=None, help="default: the settings all runs share")


def run(args: argparse.Namespace) -> None:
    path = render_report(args.run_dirs, args.out, title=args.title)
    print(f"report: {path.resolve()}")
