from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedge_cli.main import main
from fedge_cli.report import load_run, render_report, render_series, run_labels

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_run(
    root: Path,
    name: str,
    codec: str,
    accuracies: list[float | None],
    up: int,
    downlink_curve: list[int] | None = None,
) -> Path:
    """A run directory shaped like fedge simulate's: summary.json + metrics.jsonl (with
    ``downlink_curve``, bytes the devices received per version, when given)."""
    d = root / name
    d.mkdir()
    lines = []
    for i, acc in enumerate(accuracies, start=1):
        rec: dict[str, object] = {"round": i, "uplink_bytes": up, "devices": 10}
        if acc is not None:  # None: a failed round, bytes sent but no version
            rec |= {"accuracy": acc, "version": i}
        lines.append(json.dumps(rec))
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    config = {"out": str(d), "dataset": "digits", "devices": 10, "codec": codec, "lr": 0.05}
    summary: dict[str, object] = {"rounds": len(accuracies), "config": config}
    if downlink_curve is not None:
        summary["downlink_curve"] = downlink_curve
    (d / "summary.json").write_text(json.dumps(summary))
    return d


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_load_run_skips_failed_rounds_but_counts_their_bytes(tmp_path: Path) -> None:
    # Prepare
    d = make_run(tmp_path, "a", "fp32", [0.5, None, 0.7], up=1000)

    # Execute
    run = load_run(d)

    # Assert
    assert run.rounds == (1, 3)
    assert run.accuracy == (0.5, 0.7)
    assert run.cumulative_uplink == (1000, 3000)


def test_labels_name_only_the_settings_that_differ(tmp_path: Path) -> None:
    # Prepare
    runs = [
        load_run(make_run(tmp_path, "a", "fp32", [0.5], 10)),
        load_run(make_run(tmp_path, "b", "int8+zstd", [0.5], 10)),
    ]

    # Execute
    labels, title = run_labels(runs)

    # Assert
    assert labels == ["codec=fp32", "codec=int8+zstd"]
    assert "dataset=digits" in title
    assert "codec" not in title


def test_report_renders_a_png_of_two_runs(tmp_path: Path) -> None:
    # Prepare
    a = make_run(tmp_path, "a", "fp32", [0.2, 0.5, 0.7, 0.8], up=362_585)
    b = make_run(tmp_path, "b", "int8+zstd", [0.2, 0.45, 0.69, 0.79], up=30_000)
    out = tmp_path / "plots" / "report.png"

    # Execute
    written = render_report([a, b], out, dpi=50)

    # Assert: 12 x 4.8 inches at 50 dpi
    assert written == out
    assert png_size(out) == (600, 240)
    assert 5_000 < out.stat().st_size < 2_000_000


def test_cli_report_writes_the_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    a = make_run(tmp_path, "a", "fp32", [0.3, 0.6], up=100)
    b = make_run(tmp_path, "b", "fp16", [0.3, 0.6], up=50)
    out = tmp_path / "r.png"

    # Execute
    main(["report", str(a), str(b), "--out", str(out)])

    # Assert
    assert png_size(out) == (1200, 480)
    assert str(out.resolve()) in capsys.readouterr().out


def test_cli_report_on_a_non_run_directory_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    (tmp_path / "empty").mkdir()

    # Execute
    with pytest.raises(SystemExit) as exc:
        main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")])

    # Assert: a user error, exit 2, one line
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "no metrics.jsonl" in err
    assert not (tmp_path / "x.png").exists()


def test_report_plots_an_aggregator_state_dir_and_a_metrics_file(tmp_path: Path) -> None:
    # Prepare: a deployment's state_dir has metrics.jsonl (and models/, journal/), no summary
    state = make_run(tmp_path, "fedge-aggregator-state", "fp32", [0.3, None, 0.6], up=100)
    (state / "summary.json").unlink()
    (state / "models").mkdir()
    sim = make_run(tmp_path, "sim", "fp16", [0.4, 0.7], up=50)

    # Execute
    by_dir = load_run(state)
    by_file = load_run(state / "metrics.jsonl")
    out = render_report([state, sim], tmp_path / "r.png", dpi=50)

    # Assert
    assert by_dir.rounds == by_file.rounds == (1, 3)
    assert by_dir.cumulative_uplink == (100, 300)
    assert by_file.path == state
    assert run_labels([by_dir])[0] == ["fedge-aggregator-state"]
    assert png_size(out) == (600, 240)


def test_load_run_adds_the_downlink_per_version_to_the_total(tmp_path: Path) -> None:
    # Prepare: round 2 failed (uplink sent, no version, no downlink entry)
    d = make_run(tmp_path, "a", "fp32", [0.5, None, 0.7], up=1000, downlink_curve=[200, 300])

    # Execute
    run = load_run(d)

    # Assert
    assert run.cumulative_uplink == (1000, 3000)
    assert run.cumulative_total == (1200, 3500)


@pytest.mark.parametrize(
    "curve",
    [None, [200], [200, 300, 400], [200, -1], [200, "300"]],
    ids=["absent", "short", "long", "negative", "not-int"],
)
def test_a_run_without_a_usable_downlink_curve_has_no_total(
    tmp_path: Path, curve: list[object] | None
) -> None:
    # Prepare
    d = make_run(tmp_path, "a", "fp32", [0.5, 0.7], up=1000, downlink_curve=curve)  # type: ignore[arg-type]

    # Execute
    run = load_run(d)

    # Assert: the uplink panel still has it; the total panel leaves it out
    assert run.cumulative_total is None
    assert run.cumulative_uplink == (1000, 2000)


def test_report_draws_a_total_bytes_panel_when_a_run_counts_its_downlink(tmp_path: Path) -> None:
    # Prepare: one run with the downlink split, one without (a deployment's metrics)
    a = make_run(tmp_path, "a", "fp32", [0.2, 0.5, 0.8], up=300_000, downlink_curve=[9] * 3)
    b = make_run(tmp_path, "b", "int8+zstd", [0.2, 0.45, 0.79], up=30_000)
    out = tmp_path / "total.png"

    # Execute
    render_report([a, b], out, dpi=50)

    # Assert: a third panel, 18 x 4.8 inches at 50 dpi
    assert png_size(out) == (900, 240)


def test_render_series_refuses_labels_that_do_not_match_the_runs(tmp_path: Path) -> None:
    # Prepare
    run = load_run(make_run(tmp_path, "a", "fp32", [0.5], up=10))

    # Execute / Assert
    with pytest.raises(ValueError, match="one label per run"):
        render_series([run], tmp_path / "x.png", labels=["a", "b"])
    assert not (tmp_path / "x.png").exists()
