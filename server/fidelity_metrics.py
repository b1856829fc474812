"""Prometheus metrics of fidelity (``fidelity.py``): the table as gauges read at scrape time, the floor,
and the shadow runs. The dashboard (deploy/grafana) and the alert rules (deploy/prometheus) query
exactly these names; ``r`` is an r the model served or calibrated (at most its r_max), ``kind`` is
``agreement`` or ``cosine``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tome_runtime.fidelity import FidelityTable


class FidelityMetrics:
    """Registers the fidelity metrics in ``registry`` (the server's own, see ``server.metrics``)."""

    def __init__(
        self, registry: CollectorRegistry, tables: Callable[[], Iterable[FidelityTable]], floor: float | None
    ) -> None:
        """``tables`` returns every loaded model's fidelity table at scrape time; ``floor`` is
        TOME_MIN_FIDELITY (None: no floor, and no ``tome_fidelity_floor`` series)."""
        self.shadow_runs = Counter(
            "tome_shadow_runs_total",
            "Images served at r > 0 and sampled for a shadow run at r=0: run (while the model was idle) "
            "or dropped (busy).",
            ["model", "outcome"],
            registry=registry,
        )
        registry.register(FidelityCollector(tables, floor))

    def serving(self, model: str) -> None:
        """``model`` is loaded: its shadow-run series exist from now on, at 0 while TOME_SHADOW_RATE is 0."""
        for outcome in ("run", "dropped"):
            self.shadow_runs.labels(model, outcome)


class FidelityCollector(Collector):
    """The fidelity tables as gauges, read at scrape time (shadow runs change them at any time)."""

    def __init__(self, tables: Callable[[], Iterable[FidelityTable]], floor: float | None) -> None:
        self._tables, self._floor = tables, floor

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(self._families())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        fidelity, samples, floor = self._families()
        for table in self._tables():
            for row in table.rows():
                labels = [table.model, str(row.r), row.kind]
                samples.add_metric(labels, row.samples)
                if row.mean is not None and row.lower is not None:
                    fidelity.add_metric([*labels, "mean"], row.mean)
                    fidelity.add_metric([*labels, "lower"], row.lower)
            if self._floor is not None:
                for kind in table.kinds:
                    floor.add_metric([table.model, kind], self._floor)
        yield from (fidelity, samples) if self._floor is None else (fidelity, samples, floor)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        fidelity = GaugeMetricFamily(
            "tome_fidelity",
            "Fidelity of r against r=0 on the same images (kind agreement: top-1 agreement; cosine: "
            "pooled-embedding cosine): the sample mean, and its one-sided 95% lower bound.",
            labels=["model", "r", "kind", "bound"],
        )
        samples = GaugeMetricFamily(
            "tome_fidelity_samples",
            "Images behind a fidelity row (calibration, profile and shadow runs).",
            labels=["model", "r", "kind"],
        )
        floor = GaugeMetricFamily(
            "tome_fidelity_floor",
            "TOME_MIN_FIDELITY: r=auto only chooses an r whose lower bound meets it (absent when unset).",
            labels=["model", "kind"],
        )
        return fidelity, samples, floor
