"""Prometheus metrics of the batch lane, served at ``GET /metrics`` beside the serving ones.

Events (a job placed, running, preempted, retried; a placement pass) are observed by
the loop as they happen. Jobs by state and GPUs allocated are read at scrape time by a
custom collector, from a count query and the cluster's telemetry, so the loop writes
nothing per pass for them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from workers.interface.telemetry import NodeReading

_WAIT_BUCKETS_S = (
    0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 4 * 3600.0,
    12 * 3600.0,
)  # fmt: skip
_DISPATCH_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_PASS_BUCKETS_S = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
)  # fmt: skip


@dataclass(frozen=True)
class GpuCount:
    """GPUs of one type on one node: how many hold a job or replica, how many none."""

    node: str
    gpu_type: str
    allocated: int
    free: int


def gpu_counts(nodes: Sequence[NodeReading], held: Iterable[str]) -> list[GpuCount]:
    """Count each node's GPUs by type (NVML's name) as allocated (a UUID in ``held``)
    or free; a GPU marked unavailable is neither.

    >>> gpu_counts([], set())
    []
    """
    held_uuids = set(held)
    counts: dict[tuple[str, str], list[int]] = {}
    for node in nodes:
        for gpu in node.gpus:
            if not gpu.available:
                continue
            pair = counts.setdefault((node.hostname, gpu.name or "unknown"), [0, 0])
            pair[0 if gpu.uuid in held_uuids else 1] += 1
    return [GpuCount(n, t, a, f) for (n, t), (a, f) in sorted(counts.items())]


class ClusterStateCollector(Collector):
    """``jobworker_jobs`` (by state and team) and ``jobworker_gpus`` (by node, GPU type
    and allocated/free), read when Prometheus scrapes."""

    def __init__(
        self,
        job_counts: Callable[[], Mapping[tuple[str, str], int]],
        gpus: Callable[[], Sequence[GpuCount]],
    ) -> None:
        self._job_counts = job_counts
        self._gpus = gpus

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily(
            "jobworker_jobs", "Jobs in the store by state and team.", labels=["state", "team"]
        )
        for (state, team), count in sorted(self._job_counts().items()):
            jobs.add_metric([state, team], count)
        yield jobs
        gpus = GaugeMetricFamily(
            "jobworker_gpus",
            "GPUs by node, type and status: allocated (held by a job or replica) or free.",
            labels=["node", "gpu_type", "status"],
        )
        for c in self._gpus():
            gpus.add_metric([c.node, c.gpu_type, "allocated"], c.allocated)
            gpus.add_metric([c.node, c.gpu_type, "free"], c.free)
        yield gpus


class SchedulerMetrics:
    """Queue wait, dispatch latency, preemptions, retries and placement pass time.

    Dispatch latency is placed (SCHEDULED) → the worker's first RUNNING report, timed
    on ``clock`` by this control plane (a job placed by a previous one is not timed).

    Example::

        metrics = SchedulerMetrics()
        metrics.placed("j-1", "vision", queue_wait_s=4.2)
        metrics.running("j-1", "vision")
        text = metrics.render()
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.registry = CollectorRegistry()
        r = self.registry
        self._queue_wait = Histogram(
            "jobworker_queue_wait_seconds",
            "Time from submit (or the last requeue) to placement, per start.",
            ["team"],
            buckets=_WAIT_BUCKETS_S,
            registry=r,
        )
        self._dispatch = Histogram(
            "jobworker_dispatch_latency_seconds",
            "Time from placement (SCHEDULED) to the worker's first RUNNING report.",
            ["team"],
            buckets=_DISPATCH_BUCKETS_S,
            registry=r,
        )
        self._preemptions = Counter(
            "jobworker_preemptions_total", "Jobs preempted and requeued.", ["team"], registry=r
        )
        self._retries = Counter(
            "jobworker_retries_total",
            "Attempts requeued after a failure (cause=failed) or a loss (cause=lost).",
            ["team", "cause"],
            registry=r,
        )
        self._pass = Histogram(
            "jobworker_placement_pass_seconds",
            "Duration of one placement step of the loop's pass.",
            buckets=_PASS_BUCKETS_S,
            registry=r,
        )
        self._placed_at: dict[str, float] = {}
        self._throttles = Counter(
            "jobworker_throttles_total",
            "Training jobs throttled by the SLO guard, by the job's team and the deployment.",
            ["team", "deployment"],
            registry=r,
        )
        self._throttled_now = Gauge(
            "jobworker_jobs_throttled", "Training jobs throttled by the SLO guard now.", registry=r
        )

    def watch(self, collector: Collector) -> None:
        """Serve ``collector``'s families too (a :class:`ClusterStateCollector`)."""
        self.registry.register(collector)

    @contextmanager
    def placement_pass(self) -> Iterator[None]:
        """Time the ``with`` block as one placement pass."""
        start = self._clock()
        try:
            yield
        finally:
            self._pass.observe(self._clock() - start)

    def placed(self, job_id: str, team: str, queue_wait_s: float) -> None:
        self._queue_wait.labels(team).observe(max(0.0, queue_wait_s))
        self._placed_at[job_id] = self._clock()

    def running(self, job_id: str, team: str) -> None:
        placed_at = self._placed_at.pop(job_id, None)
        if placed_at is not None:
            self._dispatch.labels(team).observe(self._clock() - placed_at)

    def ended(self, job_id: str) -> None:
        """The attempt ended (before or after running): stop waiting for its report."""
        self._placed_at.pop(job_id, None)

    def preempted(self, team: str) -> None:
        self._preemptions.labels(team).inc()

    def retried(self, team: str, cause: str) -> None:
        self._retries.labels(team, cause).inc()

    def throttled(self, team: str, deployment: str) -> None:
        self._throttles.labels(team, deployment).inc()

    def throttled_now(self, jobs: int) -> None:
        self._throttled_now.set(jobs)

    def render(self) -> bytes:
        """The text exposition format (``prometheus_client.generate_latest``)."""
        return generate_latest(self.registry)
