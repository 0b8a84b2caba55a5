"""The `fedge` command as a user meets it: one clear line per error, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration


def fedge(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedge_cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def assert_one_line_error(p: subprocess.CompletedProcess[str], *words: str) -> None:
    assert p.returncode == 2, (p.returncode, p.stderr)  # a user error (operations.md)
    assert "Traceback" not in p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, p.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_unknown_dataset() -> None:
    assert_one_line_error(fedge("simulate", "--dataset", "imagenet"), "unknown dataset", "digits")


def test_bad_partition() -> None:
    assert_one_line_error(fedge("simulate", "--partition", "dirichlet:-1"), "dirichlet:ALPHA")


def test_unreachable_broker() -> None:
    p = fedge("simulate", "--broker", "mqtt://127.0.0.1:9", "--rounds", "1")
    assert_one_line_error(p, "cannot reach the broker", "127.0.0.1:9")


def test_bad_metrics_port() -> None:
    p = fedge("simulate", "--metrics-port", "70000")
    assert_one_line_error(p, "--metrics-port must be in [0, 65535]")


def test_bad_config_key(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("brokr: mqtt://x:1\n")
    assert_one_line_error(fedge("agent", "--config", str(cfg)), "brokr: unknown key", "data")


def test_bad_aggregator_value(tmp_path: Path) -> None:
    cfg = tmp_path / "aggregator.yaml"
    cfg.write_text("min_devices: 5\ntarget_devices: 3\n")
    assert_one_line_error(fedge("aggregator", "--config", str(cfg)), "min_devices")


def test_missing_config_file(tmp_path: Path) -> None:
    assert_one_line_error(fedge("aggregator", "--config", str(tmp_path / "nope.yaml")), "not found")


def test_version() -> None:
    p = fedge("--version")
    assert p.returncode == 0
    assert p.stdout.startswith("fedge 0.1.0")


@pytest.mark.parametrize("cmd", [("simulate",), ("agent",), ("aggregator",)])
def test_unknown_log_level_is_refused(cmd: tuple[str, ...]) -> None:
    p = fedge(*cmd, "--log-level", "verbose")
    assert p.returncode == 2
    assert "unknown log level 'verbose'" in p.stderr
    assert "Traceback" not in p.stderr


def test_help_shows_the_defaults() -> None:
    split = " ".join(fedge("data", "split", "--help").stdout.split())
    for default in ("(default: digits)", "(default: 10)", "(default: dirichlet:0.5)"):
        assert default in split
    assert "(default: None)" not in split
    init = " ".join(fedge("ca", "init", "--help").stdout.split())
    assert "(default: localhost 127.0.0.1)" in init
    assert "(default: default)" in init


def test_strategies_columns_line_up() -> None:
    lines = fedge("strategies").stdout.splitlines()
    names = [ln for ln in lines if not ln.startswith(" ")]
    options = [ln for ln in lines if ln.startswith("    ")]
    assert len(names) >= 10
    assert len(options) > len(names)

    def column(line: str) -> int:  # where the second column starts
        first = line.split()[0]
        start = line.index(first) + len(first)
        return start + len(line[start:]) - len(line[start:].lstrip())

    assert len({column(ln) for ln in names}) == 1
    assert len({column(ln) for ln in options}) == 1


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (("--codec", "int3"), ("unknown codec 'int3'",)),
        (("--strategy", "fedavgg"), ("unknown strategy 'fedavgg'", "fedavg")),
        (("--strategy", "fedprox", "--strategy-opt", "muu=1"), ("no option 'muu'",)),
        (("--prune", "structured:1.5"), ("--prune 'structured:1.5'", "KIND:TARGET")),
    ],
)
def test_simulate_refuses_bad_values_before_starting(
    tmp_path: Path, flags: tuple[str, ...], words: tuple[str, ...]
) -> None:
    p = fedge("simulate", *flags, "--out", str(tmp_path / "run"))
    assert_one_line_error(p, *words)
    assert "broker" not in p.stdout  # nothing started: no banner
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "args",
    [
        ("enroll", "dev1", "--ca", "{tmp}/no-ca", "--out", "{tmp}/dev1"),
        ("revoke", "dev1", "--ca", "{tmp}/no-ca"),
        ("ca", "broker-config", "--dir", "{tmp}/no-ca", "--data-dir", "{tmp}", "--out", "{tmp}/m"),
        ("report", "{tmp}", "--out", "{tmp}/r.png"),
    ],
)
def test_user_errors_exit_2(tmp_path: Path, args: tuple[str, ...]) -> None:
    assert_one_line_error(fedge(*(a.format(tmp=tmp_path) for a in args)), "error")


def test_predict_runs_onnx_without_torch(tmp_path: Path) -> None:
    from models.onnx_export import OnnxTemplate
    from models.torch_state import to_numpy_state
    from models.zoo import build_model

    onnx = OnnxTemplate("mlp", 64, 10).render(to_numpy_state(build_model("mlp", 64, 10, seed=3)))
    (tmp_path / "m.onnx").write_bytes(onnx)
    x = np.random.default_rng(0).random((4, 64), dtype=np.float32)
    np.savetxt(tmp_path / "x.csv", x, delimiter=",")
    code = (
        "import sys; from edge_agent.cli import main; "
        f"sys.argv=['x','predict','--model','{tmp_path / 'm.onnx'}','--input',"
        f"'{tmp_path / 'x.csv'}','--json']; "
        "main(sys.argv[1:]); assert 'torch' not in sys.modules, 'predict imported torch'"
    )

    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)

    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    import torch

    model = build_model("mlp", 64, 10, seed=3)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).argmax(1).tolist()
    assert out["classes"] == expected


def test_predict_missing_model(tmp_path: Path) -> None:
    p = fedge("agent", "predict", "--model", str(tmp_path / "m.onnx"), "--input", "x.csv")
    assert_one_line_error(p, "not found")


def test_simulate_flags_reach_the_aggregator(broker: object, tmp_path: Path) -> None:
    out = tmp_path / "run"
    p = fedge(
        "simulate",
        "--devices",
        "3",
        "--rounds",
        "2",
        "--partition",
        "iid",
        "--epochs",
        "1",
        "--mode",
        "async",
        "--async-buffer",
        "2",
        "--strategy",
        "fedprox",
        "--strategy-opt",
        "mu=0.5",
        "--int8",
        "--metrics-port",
        "0",
        "--broker",
        broker.url,  # type: ignore[attr-defined]
        "--out",
        str(out),
        timeout=180,
    )

    assert p.returncode == 0, p.stderr
    assert "dashboard http://127.0.0.1:" in p.stdout
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["devices"] for r in records] == [2, 2]  # async: K=2 updates per version
    assert all("int8_bytes" in r or "int8_skipped" in r for r in records)
    assert any("int8_bytes" in r for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["strategy"] == "fedprox"


def test_agent_refuses_data_of_the_wrong_width_at_start(tmp_path: Path) -> None:
    import hashlib

    from models.onnx_export import OnnxTemplate
    from models.torch_state import to_numpy_state
    from models.zoo import build_model

    # Prepare: the agent holds the fleet's 64-feature model; its data has 784 features
    state = tmp_path / "state"
    state.mkdir()
    onnx = OnnxTemplate("mlp", 64, 10).render(to_numpy_state(build_model("mlp", 64, 10, seed=3)))
    (state / "model.onnx").write_bytes(onnx)
    arch = {"name": "mlp", "input_dim": 64, "num_classes": 10}
    meta = {"version": 3, "arch": arch, "sha256": hashlib.sha256(onnx).hexdigest()}
    (state / "model.json").write_text(json.dumps(meta))
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 784), np.float32), y=np.zeros(4, np.int64))
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        f"device_id: dev1\nbroker: mqtt://127.0.0.1:9\ndata: {tmp_path / 'd.npz'}\n"
        f"state_dir: {state}\n"
    )

    # Execute, Assert
    p = fedge("agent", "--config", str(cfg))
    assert_one_line_error(p, "data has 784 features, the model expects 64", "model v3")


def test_aggregator_refuses_eval_data_of_the_wrong_width(tmp_path: Path) -> None:
    np.savez(tmp_path / "t.npz", x=np.zeros((4, 784), np.float32), y=np.zeros(4, np.int64))
    cfg = tmp_path / "aggregator.yaml"
    cfg.write_text(
        f"broker: mqtt://127.0.0.1:9\nstate_dir: {tmp_path / 'st'}\n"
        f"eval_data: {tmp_path / 't.npz'}\nmodel: {{input_dim: 64, num_classes: 10}}\n"
    )
    p = fedge("aggregator", "--config", str(cfg))
    assert_one_line_error(p, "has 784 features, the model expects 64")


def test_data_split_device_ids_must_match_devices(tmp_path: Path) -> None:
    p = fedge("data", "split", "--devices", "3", "--device-ids", "a,b", "--out", str(tmp_path))
    assert_one_line_error(p, "--device-ids names 2 devices, --devices is 3")


def test_agent_predict_loads_only_the_device_side(tmp_path: Path) -> None:
    from models.onnx_export import OnnxTemplate
    from models.torch_state import to_numpy_state
    from models.zoo import build_model

    onnx = OnnxTemplate("mlp", 64, 10).render(to_numpy_state(build_model("mlp", 64, 10, seed=3)))
    (tmp_path / "m.onnx").write_bytes(onnx)
    np.savetxt(tmp_path / "x.csv", np.zeros((2, 64), np.float32), delimiter=",")
    # What fedge[inference] does not install, and the other roles (~36 MiB of imports).
    absent = ["torch", "onnx", "aggregator", "cryptography", "pydantic", "matplotlib"]
    code = (
        "import sys; from fedge_cli.main import main; "
        f"main(['agent', 'predict', '--model', '{tmp_path / 'm.onnx'}', "
        f"'--input', '{tmp_path / 'x.csv'}']); "
        f"loaded = [m for m in {absent!r} if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [p.stdout.split()[0]] * 2


def test_output_into_a_closed_pipe_is_no_traceback() -> None:
    # `fedge strategies | head -1`: the reader is gone before fedge writes its lines.
    p = subprocess.Popen(
        [sys.executable, "-m", "fedge_cli.main", "strategies"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert p.stdout is not None
    assert p.stderr is not None
    p.stdout.close()
    with p.stderr:
        err = p.stderr.read().decode()
    p.wait(60)
    assert err == ""
    assert p.returncode == 141  # as a command killed by SIGPIPE
