"""Prometheus metrics, and the few calls that record them (one per event the server measures).

Labels stay low-cardinality: ``model`` is a loaded model's name (or "none" before the request
named a valid one), ``r`` a validated r as a string (or "none")."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

UNLABELLED = "none"

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The server's metrics, in a registry of their own so several apps can live in one process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.request_duration = Histogram(
            "tome_request_duration_seconds",
            "Time from a request's arrival to its response.",
            ["model", "r", "endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self.queue_wait = Histogram(
            "tome_queue_wait_seconds",
            "Time a request waited in its (model, r) queue before its batch ran.",
            ["model", "r"],
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self.inference = Histogram(
            "tome_inference_seconds",
            "Forward-pass time of one batch.",
            ["model", "r"],
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self.batch_size = Histogram(
            "tome_batch_size",
            "Images per batch.",
            ["model", "r"],
            buckets=_BATCH_BUCKETS,
            registry=reg,
        )
        self.queue_depth = Gauge(
            "tome_queue_depth",
            "Requests waiting in a (model, r) queue.",
            ["model", "r"],
            registry=reg,
        )
        self.requests = Counter(
            "tome_requests_total",
            "Finished requests by status code.",
            ["model", "r", "endpoint", "code"],
            registry=reg,
        )
        self.images = Counter(
            "tome_images_total",
            "Images run through a model.",
            ["model", "r"],
            registry=reg,
        )
        self.merge_rule_images = Counter(
            "tome_merge_rule_images_total",
            "Images run through a model, by merge rule (tome, mlerp).",
            ["model", "merge"],
            registry=reg,
        )
        self.tokens_merged = Counter(
            "tome_tokens_merged_total",
            "Tokens removed by merging, summed over images.",
            ["model", "r"],
            registry=reg,
        )
        self.model_info = Gauge(
            "tome_model_info",
            "Loaded models (value 1).",
            ["model", "weights", "device", "dtype"],
            registry=reg,
        )

    def observe_request(self, model: str, r: str, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(model, r, endpoint, str(status)).inc()
        self.request_duration.labels(model, r, endpoint).observe(seconds)

    def observe_batch(
        self,
        model: str,
        r: int,
        queue_waits: list[float],
        seconds: float,
        tokens_merged: int,
        merge: str = "tome",
    ) -> None:
        """One computed batch: its size, forward time, each image's queue wait, merged tokens per image."""
        labels = (model, str(r))
        self.batch_size.labels(*labels).observe(len(queue_waits))
        self.inference.labels(*labels).observe(seconds)
        for wait in queue_waits:
            self.queue_wait.labels(*labels).observe(wait)
        self.images.labels(*labels).inc(len(queue_waits))
        self.merge_rule_images.labels(model, merge).inc(len(queue_waits))
        self.tokens_merged.labels(*labels).inc(len(queue_waits) * tokens_merged)

    def set_queue_depth(self, model: str, r: int, depth: int) -> None:
        self.queue_depth.labels(model, str(r)).set(depth)

    def model_loaded(self, model: str, weights: str, device: str, dtype: str) -> None:
        self.model_info.labels(model, weights, device, dtype).set(1)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
