"""Prometheus metrics of the real-time lane, served at ``GET /metrics``.

Each control plane has its own registry, so that several can live in one
process (the tests start many).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServingMetrics:
    """Latency, batch size, queue depth, shed requests and replicas per model.

    Example::

        metrics = ServingMetrics()
        metrics.observe_latency("mlp", 0.0012)
        text = metrics.render()
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._latency = Histogram(
            "jobworker_request_latency_seconds",
            "Predict latency seen by the router, admission to answer.",
            ["model"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self._batch = Histogram(
            "jobworker_batch_size", "Rows per call to a replica.", ["model"],
            buckets=_BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self._queue = Gauge(
            "jobworker_queue_depth", "Requests waiting for a replica.", ["model"], registry=r
        )
        self._shed = Counter(
            "jobworker_requests_shed_total",
            "Requests refused by admission control (429) or for want of a replica (503).",
            ["model", "reason"],
            registry=r,
        )
        self._replicas = Gauge(
            "jobworker_replicas", "Replicas receiving traffic.", ["model"], registry=r
        )
        self._children: dict[tuple[str, str], Any] = {}

    def _child(self, metric: Any, kind: str, model: str) -> Any:
        key = (kind, model)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(model)
        return child

    def observe_latency(self, model: str, seconds: float) -> None:
        self._child(self._latency, "latency", model).observe(seconds)

    def observe_batch(self, model: str, rows: int) -> None:
        self._child(self._batch, "batch", model).observe(rows)

    def queue_depth(self, model: str, depth: int) -> None:
        self._child(self._queue, "queue", model).set(depth)

    def shed(self, model: str, reason: str) -> None:
        self._shed.labels(model, reason).inc()

    def replicas(self, model: str, count: int) -> None:
        self._child(self._replicas, "replicas", model).set(count)

    def render(self) -> bytes:
        """The text exposition format (``prometheus_client.generate_latest``)."""
        return generate_latest(self.registry)
