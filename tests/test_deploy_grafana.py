"""The Grafana dashboard: loads as JSON, covers what an operator needs, every query parses as PromQL,
uses the provisioned data source and only the server's contract metrics, and is split by r.
(tests/test_deploy_live.py compares the same queries against a running server's /metrics.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "tome-serve.json"

# Grafana's own variables, replaced by what Grafana would substitute, so that promtool can parse.
GRAFANA_SUBSTITUTIONS = {"$__rate_interval": "1m", "$__range": "1h", "$model": ".*", "$endpoint": ".*"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict]:
    return [panel for panel in dashboard()["panels"] if panel["type"] != "row"]


def queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel."""
    return [(panel["title"], target["expr"]) for panel in panels() for target in panel["targets"]]


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\btome_[a-z_]+\b", expr))


def test_dashboard_has_the_panels_an_operator_needs():
    titles = " | ".join(panel["title"].lower() for panel in panels())
    for needed in ("request rate", "p50 / p95 / p99", "queue wait", "batch size", "queue depth", "images/s"):
        assert needed in titles, f"no panel for {needed}: {titles}"
    assert dashboard()["uid"] == "tome-serve"


def test_panel_ids_and_grid_positions_are_unique():
    all_panels = dashboard()["panels"]
    assert len({panel["id"] for panel in all_panels}) == len(all_panels)
    cells = [(p["gridPos"]["x"], p["gridPos"]["y"]) for p in all_panels]
    assert len(set(cells)) == len(cells), "two panels would overlap"


def test_panels_use_the_provisioned_prometheus_data_source():
    provisioned = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = provisioned["datasources"][0]["uid"]
    (variable,) = [v for v in dashboard()["templating"]["list"] if v["type"] == "datasource"]
    assert variable["current"]["value"] == uid
    for panel in panels():
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def base_names(expr: str) -> set[str]:
    return {re.sub(r"_(bucket|sum|count)$", "", name) for name in metric_names(expr)}


def test_queries_use_contract_metrics_and_are_split_by_r():
    from test_deploy_prometheus import AUTO_METRICS, CONTRACT_METRICS, FIDELITY_METRICS

    for title, expr in queries():
        names = base_names(expr)
        assert names, f"{title}: {expr} reads no tome metric"
        assert names <= CONTRACT_METRICS | AUTO_METRICS | FIDELITY_METRICS, f"{title}: {names}"
        if names == {"tome_model_info"}:
            continue  # the model table: tome_model_info has no r label
        if names <= AUTO_METRICS or names <= FIDELITY_METRICS:
            continue  # r=auto: r is the value, not a label; fidelity: checked below
        for grouping in re.findall(r"\bby \(([^)]*)\)", expr):
            assert "r" in [label.strip() for label in grouping.split(",")], f"{title}: {expr} not split by r"
        if "histogram_quantile" in expr:
            assert re.search(r"by \(le, (endpoint, )?r\)", expr), f"{title}: quantile must keep le and r"


def test_auto_panels_show_chosen_r_load_and_target_attainment_per_model():
    from test_deploy_prometheus import AUTO_METRICS

    auto = [(title, expr) for title, expr in queries() if base_names(expr) <= AUTO_METRICS]
    titles = " | ".join(title.lower() for title, _ in auto)
    for needed in ("chosen r", "load", "target attainment", "latency / target"):
        assert needed in titles, f"no r=auto panel for {needed}: {titles}"
    used = set().union(*(base_names(expr) for _, expr in auto))
    assert used == AUTO_METRICS - {"tome_auto_latency_target_seconds"}
    for title, expr in auto:
        for grouping in re.findall(r"\bby \(([^)]*)\)", expr):
            labels = [label.strip() for label in grouping.split(",")]
            assert "model" in labels or "r" in labels, f"{title}: {expr} mixes models"
        if "histogram_quantile" in expr:
            assert re.search(r"by \(le, model\)", expr), f"{title}: quantile must keep le and model"


def test_request_panels_split_by_endpoint_and_embeddings_have_their_own():
    """An embeddings request holds several images, so its rate and latency are not /classify's: the
    request panels show each endpoint as its own series, and the embeddings panels show it whatever
    the Endpoint variable selects."""
    endpoint_metrics = {"tome_requests_total", "tome_request_duration_seconds"}
    request_panels = [
        panel
        for panel in panels()
        if any(base_names(t["expr"]) & endpoint_metrics for t in panel["targets"])
        and "embeddings" not in panel["title"].lower()
        and panel["type"] == "timeseries"
    ]
    assert len(request_panels) == 2, [panel["title"] for panel in request_panels]
    for panel in request_panels:
        for target in panel["targets"]:
            assert re.search(r"by \([^)]*\bendpoint\b", target["expr"]), (panel["title"], target["expr"])
            assert "{{endpoint}}" in target["legendFormat"], panel["title"]
    from tome_serve.middleware import ENDPOINTS

    assert "embeddings" in ENDPOINTS.values(), "the label value the embeddings panels select"
    embeddings = [panel for panel in panels() if panel["title"].lower().startswith("embeddings")]
    assert {("latency" in p["title"].lower(), "requests/s" in p["title"].lower()) for p in embeddings} == {
        (True, False),
        (False, True),
    }
    for panel in embeddings:
        for target in panel["targets"]:
            assert 'endpoint="embeddings"' in target["expr"], target["expr"]


def test_latency_panel_shows_p50_p95_p99():
    (latency,) = [p for p in panels() if p["title"].startswith("Request latency")]
    quantiles = {re.match(r"histogram_quantile\(([0-9.]+)", t["expr"]).group(1) for t in latency["targets"]}
    assert quantiles == {"0.5", "0.95", "0.99"}
    assert all("tome_request_duration_seconds_bucket" in t["expr"] for t in latency["targets"])


def test_every_query_parses_as_promql(tmp_path, promtool):
    """promtool parses each expression (as a recording rule) exactly as Prometheus would."""
    rules = []
    exprs = [expr for _, expr in queries()]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":  # label_values(metric, label) lists one label of one metric
            metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["definition"]).groups()
            exprs.append(f"group by ({label}) ({metric})")
    for index, expr in enumerate(exprs):
        for variable, value in GRAFANA_SUBSTITUTIONS.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query_{index}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_fidelity_panels_show_bounds_samples_floor_and_shadow_runs_split_by_r_and_kind():
    from test_deploy_prometheus import FIDELITY_METRICS

    fidelity = [(title, expr) for title, expr in queries() if base_names(expr) <= FIDELITY_METRICS]
    titles = " | ".join(title.lower() for title, _ in fidelity)
    for needed in ("lower bound", "samples", "floor", "shadow runs"):
        assert needed in titles, f"no fidelity panel for {needed}: {titles}"
    assert set().union(*(base_names(expr) for _, expr in fidelity)) == FIDELITY_METRICS
    for title, expr in fidelity:
        (grouping,) = re.findall(r"\bby \(([^)]*)\)", expr)
        labels = {label.strip() for label in grouping.split(",")}
        if base_names(expr) <= {"tome_fidelity", "tome_fidelity_samples"}:
            assert {"r", "kind"} <= labels, f"{title}: {expr} mixes r or kinds"
        elif "tome_fidelity_floor" in expr:
            assert labels == {"kind"}, f"{title}: {expr}"
        else:
            assert labels == {"outcome"}, f"{title}: {expr}"
