"""deploy/docker-compose.yml (and its GPU override): valid against the Compose specification's JSON
schema, internally consistent (Prometheus scrapes the server, Grafana gets its provisioning), and
configured only with settings the server really reads."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tome_serve.config import Settings

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
GPU_OVERRIDE = DEPLOY / "docker-compose.gpu.yml"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def server_env_names() -> set[str]:
    return {f"TOME_{name.upper()}" for name in Settings.model_fields}


@pytest.mark.parametrize("path", [COMPOSE, GPU_OVERRIDE], ids=lambda p: p.name)
def test_compose_file_matches_the_compose_spec_schema(path):
    checker = shutil.which("check-jsonschema")
    if checker is None:
        pytest.skip("check-jsonschema not installed (part of the dev extra)")
    # check-jsonschema ships the Compose specification's schema; no network needed.
    result = subprocess.run(
        [checker, "--builtin-schema", "vendor.compose-spec", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_rejects_a_broken_compose_file(tmp_path):
    """Guards the check above: a misspelt service key must fail it."""
    checker = shutil.which("check-jsonschema")
    if checker is None:
        pytest.skip("check-jsonschema not installed (part of the dev extra)")
    broken = load(COMPOSE)
    broken["services"]["tome"]["enviroment"] = {"TOME_MODEL": "x"}
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    result = subprocess.run(
        [checker, "--builtin-schema", "vendor.compose-spec", str(path)], capture_output=True
    )
    assert result.returncode != 0


def compose_cli() -> list[str] | None:
    """`docker compose` (plugin) or a Compose v2 `docker-compose`, if this machine has one."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        probe = subprocess.run([*command, "version"], capture_output=True, text=True)
        if probe.returncode == 0 and "v2." in probe.stdout:
            return command
    return None


def test_docker_compose_config_accepts_the_stack_and_gpu_override():
    command = compose_cli()
    if command is None:
        pytest.skip("no Docker Compose v2 CLI here (`docker compose config` needs no engine where it exists)")
    for files in (["-f", str(COMPOSE)], ["-f", str(COMPOSE), "-f", str(GPU_OVERRIDE)]):
        result = subprocess.run([*command, *files, "config", "--quiet"], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_stack_has_server_prometheus_and_grafana():
    services = load(COMPOSE)["services"]
    assert {"tome", "prometheus", "grafana"} <= set(services)
    tome = services["tome"]
    assert (
        tome["build"]["context"] == ".."
        and (COMPOSE.parent / tome["build"]["context"] / "Dockerfile").exists()
    )
    assert any(str(port).endswith(":8000") for port in tome["ports"])
    assert any(volume.endswith(":/cache") for volume in tome["volumes"]), "weights cache volume"


def test_server_environment_uses_only_real_settings():
    environment = load(COMPOSE)["services"]["tome"]["environment"]
    unknown = set(environment) - server_env_names()
    assert not unknown, f"the server reads no such setting: {sorted(unknown)}"


def test_stop_grace_period_outlasts_the_request_timeout():
    tome = load(COMPOSE)["services"]["tome"]
    grace_s = int(tome["stop_grace_period"].rstrip("s"))
    timeout_ms = int(tome["environment"]["TOME_REQUEST_TIMEOUT_MS"].split(":-")[1].rstrip("}"))
    # After SIGTERM the server drains for up to the request timeout + 5 s (server/__main__.py).
    assert grace_s * 1000 > timeout_ms + 5000


def test_prometheus_scrapes_the_server_service():
    prometheus = load(COMPOSE)["services"]["prometheus"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in prometheus["volumes"]}
    config_dir = DEPLOY / mounts["/etc/prometheus"]
    config = load(config_dir / "prometheus.yml")
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "tome-serve"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert targets == ["tome:8000"], "target must be the compose service name and the server's port"


def test_grafana_mounts_provisioning_and_dashboards():
    grafana = load(COMPOSE)["services"]["grafana"]
    mounts = {v.split(":")[1]: DEPLOY / v.split(":")[0] for v in grafana["volumes"] if v.startswith("./")}
    provisioning = mounts["/etc/grafana/provisioning"]
    datasource = load(provisioning / "datasources" / "prometheus.yml")["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    provider = load(provisioning / "dashboards" / "tome-serve.yml")["providers"][0]
    dashboards_dir = provider["options"]["path"]
    assert mounts[dashboards_dir].joinpath("tome-serve.json").is_file()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_dir}/tome-serve.json"


def test_gpu_override_reserves_nvidia_gpus_with_real_settings():
    tome = load(GPU_OVERRIDE)["services"]["tome"]
    (device,) = tome["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert set(tome["environment"]) <= server_env_names()


def test_the_state_folder_is_a_named_volume():
    """TOME_STATE_DIR's default is mounted from a named volume, so a recreated container starts from the
    measured cost table; the image owns that folder by the server's user (a fresh volume copies it)."""
    compose = load(COMPOSE)
    tome = compose["services"]["tome"]
    default = tome["environment"]["TOME_STATE_DIR"].removeprefix("${TOME_STATE_DIR-").removesuffix("}")
    mounts = {volume.split(":")[1].split()[0]: volume.split(":")[0] for volume in tome["volumes"]}
    assert mounts[default] in compose["volumes"]
    dockerfile = (REPO / "Dockerfile").read_text()
    assert f"mkdir -p /cache/huggingface /cache/torch {default}" in dockerfile
    assert f"chown -R tome:tome /cache {default}" in dockerfile
