"""``fedge report RUN_DIR [RUN_DIR...] --out PNG``: plot runs side by side.

Reads each run directory written by ``fedge simulate`` (``summary.json`` and
``metrics.jsonl``; the Flower side of ``bench/vs_flower`` writes the same two files), or a real
deployment's ``metrics.jsonl`` (the aggregator's ``state_dir``, or the file itself), and draws
one PNG with two panels: central accuracy against rounds, and against cumulative uplink bytes
(log scale), one line per run. A run is labelled by the settings in which the runs differ
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

__all__ = ["RunSeries", "add_arguments", "load_run", "render_report", "run", "run_labels"]

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
    rounds: list[int] = []
    acc: list[float] = []
    cum: list[int] = []
    total = 0
    for r in records:
        # A failed round (no quorum) has no version and no accuracy, but its bytes were sent.
        total += int(r.get("uplink_bytes", 0))
        if r.get("accuracy") is None or r.get("round") is None:
            continue
        rounds.append(int(r["round"]))
        acc.append(float(r["accuracy"]))
        cum.append(total)
    if not rounds:
        raise ValueError(f"{run_dir}: metrics.jsonl has no round with an accuracy")
    return RunSeries(run_dir, dict(config or {}), tuple(rounds), tuple(acc), tuple(cum))


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
    """Draw the two panels for ``run_dirs`` into the PNG ``out``; return its path."""
    if not run_dirs:
        raise ValueError("fedge report needs at least one run directory")
    runs = [load_run(Path(d)) for d in run_dirs]
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("fedge report needs matplotlib: pip install matplotlib") from None

    labels, shared = run_labels(runs)
    fig, (ax_r, ax_b) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=dpi, constrained_layout=True)
    try:
        for r, label in zip(runs, labels, strict=True):
            (line,) = ax_r.plot(r.rounds, r.accuracy, marker=".", label=label)
            ax_b.plot(r.cumulative_uplink, r.accuracy, marker=".", color=line.get_color())
        ax_r.set(xlabel="round", ylabel="central accuracy", title="accuracy vs rounds")
        ax_b.set(xlabel="cumulative uplink bytes", xscale="log", title="accuracy vs uplink bytes")
        for ax in (ax_r, ax_b):
            ax.grid(True, alpha=0.3)
        # As many columns as fit the figure's width (~140 characters at this font size).
        ncols = max(1, min(len(runs), 140 // max(len(lab) + 6 for lab in labels)))
        fig.legend(loc="outside lower center", ncols=ncols, fontsize="small")
        fig.suptitle(title if title is not None else shared)
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
