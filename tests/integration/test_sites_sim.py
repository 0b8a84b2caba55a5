"""`fedge simulate --sites 2` against the flat topology, and `fedge gateway` as a process."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from models.onnx_weights import read_initializers
from simulation.fleet import SimConfig, simulate
from simulation.sites import SiteBrokers
from tests.integration.test_cli import assert_one_line_error, fedge

pytestmark = pytest.mark.integration


def test_two_sites_train_the_flat_fleets_model_and_fetch_it_once_per_site(tmp_path: Path) -> None:
    common = {"devices": 4, "rounds": 2, "epochs": 1, "codec": "fp32", "partition": "iid"}
    flat = simulate(SimConfig(out=tmp_path / "flat", wan=True, **common), say=lambda _s: None)
    sites = simulate(SimConfig(out=tmp_path / "sites", sites=2, **common), say=lambda _s: None)

    assert (sites["rounds"], sites["failed_rounds"]) == (2, 0)
    assert sites["sites"] == {"gw-s0": 4, "gw-s1": 4}  # 2 devices x 2 rounds each, once
    a = read_initializers(Path(flat["model_onnx"]).read_bytes())
    b = read_initializers(Path(sites["model_onnx"]).read_bytes())
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6)
    assert sites["wan_bytes"] == sites["wan"]["bytes_up"] + sites["wan"]["bytes_down"] > 0
    # The model crosses each bridge once per version instead of once per device.
    assert sites["wan"]["bytes_down"] < flat["wan"]["bytes_down"]
    assert flat["wan_bytes"] > 0


def test_fedge_gateway_runs_on_its_site_broker_and_stops_on_sigterm(tmp_path: Path) -> None:
    with SiteBrokers(tmp_path / "brokers", ["a"], fleet="f1") as sites:
        (tmp_path / "gateway.yaml").write_text(
            f"broker: {sites.site('a').url}\nfleet: f1\nsite: a\nstate_dir: {tmp_path / 'gw'}\n"
        )
        p = subprocess.Popen(
            [sys.executable, "-m", "fedge_cli.main", "gateway", "--config",
             str(tmp_path / "gateway.yaml")],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            # It connects to its site broker under its identity (= client id) gw-a.
            end = time.monotonic() + 20
            log = sites.site("a").log_path
            while "as gw-a " not in log.read_text():
                assert time.monotonic() < end, log.read_text()[-1000:]
                time.sleep(0.1)
        finally:
            p.send_signal(signal.SIGTERM)
            out, _ = p.communicate(timeout=20)
        assert p.returncode == 0, out
        assert "fedge gateway gw-a" in out


def test_a_bad_gateway_config_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text("broker: mqtt://127.0.0.1:1\nsite: no/slash\nstate_dir: x\n")
    assert_one_line_error(fedge("gateway", "--config", str(cfg)), "site")
