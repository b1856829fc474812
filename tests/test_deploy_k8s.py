"""deploy/k8s: every manifest valid against the Kubernetes OpenAPI schemas (strict: unknown fields
fail), and the resources wired to each other and to the server the way a rollout needs."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tome_serve.config import Settings

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
K8S = REPO / "deploy" / "k8s"
AUTO_HPA = K8S / "auto" / "hpa.yaml"
ADAPTER_RULES = K8S / "auto" / "prometheus-adapter-rules.yml"
MANIFESTS = sorted(K8S.rglob("*.yaml"))
# Oldest Kubernetes minor the manifests must still apply to (autoscaling/v2 and policy/v1 are GA there),
# and the newest the schema package knows.
KUBERNETES_VERSIONS = ["1.29.0", None]


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def resource(kind: str, name: str = "tome-serve") -> dict:
    """The resource from deploy/k8s itself, before any from an optional subfolder (auto/, monitoring/)."""
    for path in sorted(MANIFESTS, key=lambda p: (p.parent != K8S, p)):
        for doc in documents(path):
            if doc["kind"] == kind and doc["metadata"]["name"] == name:
                return doc
    raise AssertionError(f"no {kind}/{name} in deploy/k8s")


def container() -> dict:
    (main,) = resource("Deployment")["spec"]["template"]["spec"]["containers"]
    return main


def test_manifests_exist():
    kinds = {doc["kind"] for path in MANIFESTS for doc in documents(path)}
    expected = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap"}
    assert expected | {"ServiceMonitor"} <= kinds


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS, ids=lambda v: v or "latest")
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_matches_kubernetes_schema(path, version):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="part of the dev extra")
    version = version or kubernetes_validate.latest_version()
    for doc in documents(path):
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no schema ships for it; checked structurally below
        kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_rejects_a_misspelt_field():
    """Guards the check above: strict schemas must catch an unknown field."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="part of the dev extra")
    deployment = resource("Deployment")
    container_spec = deployment["spec"]["template"]["spec"]["containers"][0]
    container_spec["readinesProbe"] = container_spec.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)


def test_service_monitor_structure():
    """ServiceMonitor is a Prometheus Operator CRD, so no Kubernetes schema covers it: check the fields the
    operator needs, and that it selects the Service and names one of its ports."""
    monitor = resource("ServiceMonitor")
    service = resource("Service")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    port_names = {port["name"] for port in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}


def test_services_select_the_deployment_pods_on_its_named_port():
    pod_labels = resource("Deployment")["spec"]["template"]["metadata"]["labels"]
    container_ports = {port["name"]: port["containerPort"] for port in container()["ports"]}
    for name in ("tome-serve", "tome-serve-metrics"):
        service = resource("Service", name)
        assert service["spec"]["selector"].items() <= pod_labels.items()
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in container_ports
    assert resource("Service", "tome-serve-metrics")["spec"]["publishNotReadyAddresses"] is True


def test_probes_use_readyz_for_readiness_and_healthz_for_liveness():
    main = container()
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
    startup = main["startupProbe"]
    assert startup["httpGet"]["path"] == "/healthz"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "model loading needs minutes"


def test_graceful_shutdown_outlasts_drain_and_request_timeout():
    pod = resource("Deployment")["spec"]["template"]["spec"]
    pre_stop = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    timeout_s = int(resource("ConfigMap", "tome-serve-config")["data"]["TOME_REQUEST_TIMEOUT_MS"]) / 1000
    # After SIGTERM the server drains for up to the request timeout + 5 s (server/__main__.py).
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + timeout_s + 5


def test_resources_security_and_rollout():
    main = container()
    assert {"cpu", "memory"} <= set(main["resources"]["requests"])
    assert "memory" in main["resources"]["limits"]
    pod = resource("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    image_user = [line.split()[1] for line in DOCKERFILE.read_text().splitlines() if line.startswith("USER ")]
    assert str(pod["securityContext"]["runAsUser"]) == image_user[-1].split(":")[0], "the image's USER"
    assert resource("Deployment")["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_configuration_comes_from_the_config_map_and_names_real_settings():
    config_map = resource("ConfigMap", "tome-serve-config")
    assert {"configMapRef": {"name": "tome-serve-config"}} in container()["envFrom"]
    settings = {f"TOME_{name.upper()}" for name in Settings.model_fields}
    tome_keys = {key for key in config_map["data"] if key.startswith("TOME_")}
    assert tome_keys and tome_keys <= settings, sorted(tome_keys - settings)
    assert all(isinstance(value, str) for value in config_map["data"].values())
    env = {item["name"]: item for item in container()["env"]}
    assert env["TOME_HOST"]["value"] == "0.0.0.0"
    assert env["TOME_API_KEY"]["valueFrom"]["secretKeyRef"]["optional"] is True


def test_autoscaler_and_disruption_budget_target_the_deployment():
    hpa, deployment = resource("HorizontalPodAutoscaler"), resource("Deployment")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2, "one replica must stay up while another restarts"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    pdb = resource("PodDisruptionBudget")
    pod_labels = resource("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def adapter_rules() -> list[dict]:
    values = yaml.safe_load(ADAPTER_RULES.read_text())
    assert values["rules"]["default"] is False, "only our rules: the chart's defaults expose every series"
    return values["rules"]["custom"]


def test_auto_autoscaler_replaces_the_cpu_one_and_scales_on_adapter_metrics():
    """deploy/k8s/auto/hpa.yaml has the CPU autoscaler's name and target, so applying it replaces that
    one (two autoscalers on one Deployment would fight), and scales on Pods metrics the adapter serves."""
    (auto,) = documents(AUTO_HPA)
    cpu = resource("HorizontalPodAutoscaler")
    assert auto["kind"] == cpu["kind"] and auto["metadata"]["name"] == cpu["metadata"]["name"]
    assert auto["spec"]["scaleTargetRef"] == cpu["spec"]["scaleTargetRef"]
    assert auto["spec"]["minReplicas"] >= 2
    served = {rule["name"]["as"] for rule in adapter_rules()}
    names = []
    for metric in auto["spec"]["metrics"]:
        assert metric["type"] == "Pods"
        assert metric["pods"]["target"]["type"] == "AverageValue"
        names.append(metric["pods"]["metric"]["name"])
    assert set(names) == {"tome_auto_load_ratio", "tome_auto_target_missed_ratio"}
    assert set(names) <= served


def test_adapter_rules_map_series_to_pods_and_read_only_auto_metrics():
    from test_deploy_prometheus import AUTO_METRICS

    for rule in adapter_rules():
        assert rule["resources"]["overrides"] == {
            "namespace": {"resource": "namespace"},
            "pod": {"resource": "pod"},
        }
        series = re.match(r"(\w+)\{", rule["seriesQuery"]).group(1)
        assert re.search(rule["name"]["matches"], series), rule["name"]
        assert 'namespace!=""' in rule["seriesQuery"] and 'pod!=""' in rule["seriesQuery"]
        query = rule["metricsQuery"]
        assert query.count("<<.GroupBy>>") >= 2 and "<<.LabelMatchers>>" in query
        for name in re.findall(r"\btome_[a-z_]+\b", query):
            assert re.sub(r"_(bucket|sum|count)$", "", name) in AUTO_METRICS, f"{rule['name']['as']}: {name}"


def test_adapter_queries_parse_as_promql(tmp_path):
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip(
            "promtool not installed (Debian: apt-get install prometheus; scripts/test does it as root)"
        )
    substitutions = {
        "<<.GroupBy>>": "namespace, pod",
        "<<.LabelMatchers>>": 'namespace="default", pod=~"a|b"',
    }
    rules = []
    for index, rule in enumerate(adapter_rules()):
        query = rule["metricsQuery"]
        for placeholder, value in substitutions.items():
            query = query.replace(placeholder, value)
        rules.append({"record": f"adapter:query_{index}", "expr": query})
    rules.append({"record": "adapter:series", "expr": adapter_rules()[0]["seriesQuery"]})
    path = tmp_path / "adapter_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": rules}]}))
    result = subprocess.run([tool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_state_folder_is_a_node_volume_the_server_user_can_write():
    """TOME_STATE_DIR is mounted from the node (a pod's emptyDir would be measured again by every new
    pod), and the init container hands the kubelet-created (root-owned) folder to the server's user."""
    pod = resource("Deployment")["spec"]["template"]["spec"]
    env = {item["name"]: item.get("value") for item in container()["env"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in container()["volumeMounts"]}
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[env["TOME_STATE_DIR"]])
    assert volume["hostPath"]["type"] == "DirectoryOrCreate"
    (init,) = pod["initContainers"]
    folder = env["TOME_STATE_DIR"]
    assert {m["name"]: m["mountPath"] for m in init["volumeMounts"]} == {volume["name"]: folder}
    owner = f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
    assert init["command"] == ["chown", owner, folder]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
