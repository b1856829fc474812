"""Prometheus metrics of r=auto: the r it chose, latency against the target, met/missed/shed, and the
measured timing table. The dashboard (deploy/grafana), the recording rules and the autoscaling rules
(deploy/k8s/auto) query exactly these names; ``model`` is a loaded model's name, nothing else is a
label of unbounded cardinality (``r`` and ``batch_size`` are grid values of the timing table)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .timings import TimingTable

# Chosen r: the timing table's grid is 0, 4, 8, ... up to a model's r_max (24 for ViT-S/16, larger for
# bigger inputs), so every grid value below 32 is its own bucket.
R_BUCKETS = (0, 4, 8, 12, 16, 20, 24, 32, 48, 64, 96)
# Latency / target: 1.0 is the line between met and missed; finer around it.
RATIO_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0)

MET, MISSED, SHED = "met", "missed", "shed"


class AutoMetrics:
    """Registers the r=auto metrics in ``registry`` (the server's own, see ``server.metrics``)."""

    def __init__(
        self, registry: CollectorRegistry, tables: Callable[[], Iterable[TimingTable]], lanes: int = 1
    ) -> None:
        """``tables`` returns the timing table of every loaded model at scrape time; ``lanes`` is the
        number of batches of one model that run side by side (TOME_INSTANCES)."""
        self.chosen_r = Histogram(
            "tome_auto_r",
            "r chosen by r=auto, observed once per answered auto request.",
            ["model"],
            buckets=R_BUCKETS,
            registry=registry,
        )
        self.target_ratio = Histogram(
            "tome_auto_target_ratio",
            "Latency of an answered auto request divided by its latency target (<= 1: met).",
            ["model"],
            buckets=RATIO_BUCKETS,
            registry=registry,
        )
        self.outcomes = Counter(
            "tome_auto_requests_total",
            "Auto requests by outcome: met (answered within its target), missed (answered late, or "
            "504), shed (refused with 429 because even its auto ceiling could not meet the target).",
            ["model", "outcome"],
            registry=registry,
        )
        self.target = Gauge(
            "tome_auto_latency_target_seconds",
            "The server-wide latency target of auto requests (TOME_LATENCY_TARGET_MS).",
            ["model"],
            registry=registry,
        )
        registry.register(TimingCollector(tables, lanes))

    def answered(self, model: str, r: int, latency_s: float, target_s: float) -> None:
        self.chosen_r.labels(model).observe(r)
        self.target_ratio.labels(model).observe(latency_s / target_s)
        self.outcomes.labels(model, MET if latency_s <= target_s else MISSED).inc()

    def timed_out(self, model: str) -> None:
        self.outcomes.labels(model, MISSED).inc()

    def shed(self, model: str) -> None:
        self.outcomes.labels(model, SHED).inc()


class TimingCollector(Collector):
    """The timing tables as gauges, read at scrape time (they change with every real batch)."""

    def __init__(self, tables: Callable[[], Iterable[TimingTable]], lanes: int = 1) -> None:
        self._tables, self._lanes = tables, lanes

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(self._families())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        speed, dominated, capacity = self._families()
        for table in self._tables():
            for labels, images_per_s, is_dominated in table.metric_rows():
                values = [labels["model"], labels["r"], labels["batch_size"]]
                speed.add_metric(values, images_per_s)
                dominated.add_metric(values, 1.0 if is_dominated else 0.0)
                if labels["batch_size"] == str(table.max_batch):
                    capacity.add_metric([labels["model"], labels["r"]], self._lanes * images_per_s)
        yield from (speed, dominated, capacity)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        labels = ["model", "r", "batch_size"]
        speed = GaugeMetricFamily(
            "tome_cost_images_per_second",
            "Measured images/s of one batch of batch_size images at r (timing table of r=auto).",
            labels=labels,
        )
        dominated = GaugeMetricFamily(
            "tome_cost_dominated",
            "1 where r is not faster than a smaller r at this batch size (r=auto never chooses it).",
            labels=labels,
        )
        capacity = GaugeMetricFamily(
            "tome_auto_capacity_images_per_second",
            "Measured images/s of full batches at r on all inference threads of the model: the load "
            "a replica carries at r. Offered auto load over the r=0 value is the autoscaling signal.",
            labels=["model", "r"],
        )
        return speed, dominated, capacity
