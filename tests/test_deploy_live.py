"""The deployment files against a real running server (tiny random ViT): the container healthcheck
passes, the probes the manifests use answer, the live /metrics exposition passes `promtool check
metrics`, and every metric the dashboard and the alert rules query is really exported, with an r
label where they split by r."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from serverutil import png
from test_deploy_docker import healthcheck_command
from test_deploy_prometheus import EXPORTED_WITH_SETTING, NOT_YET_EXPORTED

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "tome-serve.json"
RULES = REPO / "deploy" / "prometheus" / "rules.yml"


@pytest.fixture(scope="module")
def live_metrics(tiny_server: str) -> str:
    """/metrics after answered (fixed and auto r), merged, visualized, rejected and embeddings requests,
    so every series exists."""
    image = png("orange", (96, 80))
    with httpx.Client(base_url=tiny_server, timeout=30) as client:
        for r in (0, 8, "auto"):
            response = client.post(f"/classify?r={r}", files={"file": ("a.png", image, "image/png")})
            assert response.status_code == 200, response.text
        assert (
            client.post("/visualize?r=8", content=image, headers={"Content-Type": "image/png"}).status_code
            == 200
        )
        assert client.post("/classify?r=-1", files={"file": ("a.png", image, "image/png")}).status_code == 422
        uri = "data:image/png;base64," + base64.b64encode(image).decode()
        assert client.post("/v1/embeddings", json={"input": [uri, uri], "r": 8}).status_code == 200
        return client.get("/metrics").text


def samples(exposition: str) -> dict[str, list[dict[str, str]]]:
    """Sample name (with _bucket/_sum/_count/_total) -> label sets seen."""
    found: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(sample.labels)
    return found


def test_container_healthcheck_passes_against_the_running_server(tiny_server):
    port = str(urlsplit(tiny_server).port)
    command = [sys.executable, *healthcheck_command()[1:]]
    result = subprocess.run(command, env={"TOME_PORT": port}, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_probe_paths_of_the_manifests_answer(tiny_server):
    deployment = yaml.safe_load((REPO / "deploy" / "k8s" / "deployment.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        path = container[probe]["httpGet"]["path"]
        assert httpx.get(tiny_server + path, timeout=10).status_code == 200, f"{probe} {path}"


def test_live_metrics_pass_promtool_check_metrics(live_metrics, promtool):
    result = promtool("check", "metrics", input=live_metrics)
    assert result.returncode == 0, result.stdout + result.stderr


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def rule_expressions() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_queried_metrics_are_exported_with_the_labels_used(live_metrics, source):
    exported = samples(live_metrics)
    exprs = dashboard_expressions() if source == "dashboard" else rule_expressions()
    for expr in exprs:
        for name in set(re.findall(r"\btome_[a-z_]+\b", expr)):
            if re.sub(r"_(bucket|sum|count)$", "", name) in NOT_YET_EXPORTED:
                continue  # defined in the deploy files before the server exports it
            if name in EXPORTED_WITH_SETTING:
                continue  # not under the default settings of this server
            assert name in exported, f"{source} queries {name}, which the server does not export"
            used = set(re.findall(r"\b(?:by|on) \(([^)]*)\)", expr))
            labels = {label.strip() for group in used for label in group.split(",")} - {"le", ""}
            for label in labels:
                assert all(label in sample for sample in exported[name]), f"{name} has no label {label!r}"
        # A selector's labels belong to its own metric (tome_a{x="1"} / tome_b: only tome_a needs x).
        for name, selector in re.findall(r"\b(tome_[a-z_]+)\s*\{([^}]*)\}", expr):
            if name in EXPORTED_WITH_SETTING:
                continue
            for label in re.findall(r"(\w+)\s*=~?\"", selector):
                assert all(label in sample for sample in exported[name]), f"{name} has no label {label!r}"
