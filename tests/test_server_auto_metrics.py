"""The r=auto metrics: names and labels the deploy files query, outcomes counted against the target,
and the timing table exported at scrape time (so it follows real batches)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from autofakes import cpu_like, warmed_table
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_deploy_prometheus import AUTO_METRICS

from tome_serve.auto.metrics import AutoMetrics


def values(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    """Every sample of ``registry`` by name and labels (one scrape, so a test sees what Prometheus would)."""
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_outcomes_chosen_r_and_latency_against_target():
    registry = CollectorRegistry()
    table = warmed_table()
    metrics = AutoMetrics(registry, lambda: [table])
    metrics.answered("vit", r=16, latency_s=0.2, target_s=0.25)
    metrics.answered("vit", r=24, latency_s=0.3, target_s=0.25)
    metrics.timed_out("vit")
    metrics.shed("vit")
    found = values(registry)
    model = (("model", "vit"),)
    assert found[("tome_auto_requests_total", (("model", "vit"), ("outcome", "met")))] == 1
    assert found[("tome_auto_requests_total", (("model", "vit"), ("outcome", "missed")))] == 2
    assert found[("tome_auto_requests_total", (("model", "vit"), ("outcome", "shed")))] == 1
    assert found[("tome_auto_r_sum", model)] == 40 and found[("tome_auto_r_count", model)] == 2
    assert found[("tome_auto_target_ratio_bucket", (("le", "1.0"), ("model", "vit")))] == 1
    assert found[("tome_auto_target_ratio_bucket", (("le", "1.25"), ("model", "vit")))] == 2


def test_cost_table_is_read_at_scrape_time():
    registry = CollectorRegistry()
    table = warmed_table()
    AutoMetrics(registry, lambda: [table])
    key = ("tome_cost_images_per_second", (("batch_size", "8"), ("model", "fake"), ("r", "16")))
    assert values(registry)[key] == pytest.approx(8 / cpu_like(16, 8))
    for _ in range(100):
        table.observe(16, 8, 2 * cpu_like(16, 8))
    assert values(registry)[key] == pytest.approx(4 / cpu_like(16, 8), rel=0.1)
    dominated = ("tome_cost_dominated", (("batch_size", "1"), ("model", "fake"), ("r", "16")))
    assert values(registry)[dominated] == 1.0


def test_capacity_counts_every_inference_thread():
    registry = CollectorRegistry()
    table = warmed_table()
    AutoMetrics(registry, lambda: [table], lanes=2)
    key = ("tome_auto_capacity_images_per_second", (("model", "fake"), ("r", "0")))
    assert values(registry)[key] == pytest.approx(2 * 8 / cpu_like(0, 8))


def test_every_auto_metric_the_deploy_files_use_is_registered():
    registry = CollectorRegistry()
    table = warmed_table()
    metrics = AutoMetrics(registry, lambda: [table])
    metrics.target.labels("vit").set(0.25)
    metrics.answered("vit", 0, 0.1, 0.25)
    text = generate_latest(registry).decode()
    names = {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}
    bases = {re.sub(r"_(bucket|sum|count)$", "", name) for name in names}
    assert not AUTO_METRICS - bases, AUTO_METRICS - bases


def test_exposition_passes_promtool_check_metrics():
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    registry = CollectorRegistry()
    table = warmed_table()
    metrics = AutoMetrics(registry, lambda: [table])
    metrics.answered("vit", 8, 0.1, 0.25)
    result = subprocess.run(
        [tool, "check", "metrics"], input=generate_latest(registry), capture_output=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
