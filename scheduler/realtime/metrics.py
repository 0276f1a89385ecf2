"""Prometheus metrics of the real-time lane, served at ``GET /metrics``.

Each control plane has its own registry, so that several can live in one
process (the tests start many).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


WINDOW_S = 30.0  # the console's requests/s, percentiles and batch size look back this far


@dataclass(frozen=True)
class ModelSummary:
    """A model's recent traffic (the last ``window_s``), for the console.

    ``p50_ms``/``p99_ms``/``mean_batch_size`` are None with no traffic in the window;
    ``shed_total`` counts every refused request since the start.
    """

    requests_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    mean_batch_size: float | None
    shed_total: int
    window_s: float


class ServingMetrics:
    """Latency, batch size, queue depth, shed requests and replicas per model.

    Example::

        metrics = ServingMetrics()
        metrics.observe_latency("mlp", 0.0012)
        text = metrics.render()
    """

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, window_s: float = WINDOW_S
    ) -> None:
        self._clock = clock
        self._window_s = window_s
        self._recent_latency: dict[str, deque[tuple[float, float]]] = {}  # (at, seconds)
        self._recent_batch: dict[str, deque[tuple[float, int]]] = {}  # (at, rows)
        self._shed_total: dict[str, int] = {}
        self._recent_lock = threading.Lock()  # the router's thread writes, the API's read
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
        self._remember(self._recent_latency, model, seconds)

    def observe_batch(self, model: str, rows: int) -> None:
        self._child(self._batch, "batch", model).observe(rows)
        self._remember(self._recent_batch, model, rows)

    def queue_depth(self, model: str, depth: int) -> None:
        self._child(self._queue, "queue", model).set(depth)

    def shed(self, model: str, reason: str) -> None:
        self._shed.labels(model, reason).inc()
        self._shed_total[model] = self._shed_total.get(model, 0) + 1

    def replicas(self, model: str, count: int) -> None:
        self._child(self._replicas, "replicas", model).set(count)

    def summary(self, model: str) -> ModelSummary:
        """The model's traffic over the last ``window_s`` (see :class:`ModelSummary`)."""
        since = self._clock() - self._window_s
        with self._recent_lock:
            latencies = sorted(s for at, s in self._recent_latency.get(model, ()) if at > since)
            rows = [n for at, n in self._recent_batch.get(model, ()) if at > since]
        return ModelSummary(
            requests_per_s=len(latencies) / self._window_s,
            p50_ms=_percentile(latencies, 0.50) * 1000 if latencies else None,
            p99_ms=_percentile(latencies, 0.99) * 1000 if latencies else None,
            mean_batch_size=sum(rows) / len(rows) if rows else None,
            shed_total=self._shed_total.get(model, 0),
            window_s=self._window_s,
        )

    def recent_p99_ms(self, model: str, window_s: float) -> float | None:
        """The model's p99 over the last ``window_s`` (at most ``WINDOW_S``); None: no traffic."""
        since = self._clock() - window_s
        with self._recent_lock:
            latencies = sorted(s for at, s in self._recent_latency.get(model, ()) if at > since)
        return _percentile(latencies, 0.99) * 1000 if latencies else None

    def _remember(self, recent: dict[str, deque[Any]], model: str, value: float) -> None:
        now = self._clock()
        with self._recent_lock:
            window = recent.get(model)
            if window is None:
                window = recent[model] = deque()
            window.append((now, value))
            while window[0][0] <= now - self._window_s:
                window.popleft()

    def render(self) -> bytes:
        """The text exposition format (``prometheus_client.generate_latest``)."""
        return generate_latest(self.registry)


def _percentile(ordered: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile of an ascending, non-empty list."""
    rank = math.ceil(round(q * len(ordered), 9))
    return ordered[max(rank, 1) - 1]
