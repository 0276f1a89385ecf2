"""The batch lane's Prometheus metrics: the scrape-time collector and the loop's events,
read back through the text exposition format as Prometheus would."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

from scheduler.batch.metrics import ClusterStateCollector, GpuCount, SchedulerMetrics, gpu_counts
from tests.unit.placement_factories import uuid
from workers.interface.telemetry import GpuReading, NodeReading


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def samples(metrics: SchedulerMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of ``metrics.render()``: (name, labels) → value."""
    text = metrics.render().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def labels(**kw: str) -> frozenset[tuple[str, str]]:
    return frozenset(kw.items())


def test_gpu_counts_split_each_nodes_gpus_by_type_into_allocated_and_free(
    make_node: Callable[..., NodeReading], make_gpu: Callable[..., GpuReading]
) -> None:
    a = make_node(
        "node-a",
        gpus=[
            make_gpu(0, name="A100"),
            make_gpu(1, name="A100"),
            make_gpu(2, name="A100", available=False),  # lost: neither allocated nor free
            make_gpu(3, name="H100"),
        ],
    )
    b = make_node("node-b", gpus=[make_gpu(0, name=None)])
    held = {uuid("node-a", 1), uuid("node-a", 2), uuid("node-b", 0)}
    assert gpu_counts([b, a], held) == [
        GpuCount("node-a", "A100", allocated=1, free=1),
        GpuCount("node-a", "H100", allocated=0, free=1),
        GpuCount("node-b", "unknown", allocated=1, free=0),
    ]


def test_collector_reads_jobs_and_gpus_at_each_scrape() -> None:
    counts = {("RUNNING", "vision"): 2, ("PENDING", "nlp"): 1}
    gpus = [GpuCount("node-a", "A100", allocated=1, free=3)]
    metrics = SchedulerMetrics()
    metrics.watch(ClusterStateCollector(lambda: counts, lambda: gpus))

    first = samples(metrics)
    assert first[("jobworker_jobs", labels(state="RUNNING", team="vision"))] == 2
    assert first[("jobworker_jobs", labels(state="PENDING", team="nlp"))] == 1
    gpu = {"node": "node-a", "gpu_type": "A100"}
    assert first[("jobworker_gpus", labels(**gpu, status="allocated"))] == 1
    assert first[("jobworker_gpus", labels(**gpu, status="free"))] == 3

    counts[("RUNNING", "vision")] = 0
    del counts[("PENDING", "nlp")]
    second = samples(metrics)
    assert second[("jobworker_jobs", labels(state="RUNNING", team="vision"))] == 0
    assert ("jobworker_jobs", labels(state="PENDING", team="nlp")) not in second


def test_queue_wait_and_dispatch_latency_are_observed_per_team() -> None:
    clock = FakeClock()
    metrics = SchedulerMetrics(clock)
    metrics.placed("j-1", "vision", queue_wait_s=12.5)
    clock.now_s += 3.0
    metrics.running("j-1", "vision")
    metrics.running("j-1", "vision")  # a second report of the same start is not timed again
    metrics.running("j-2", "vision")  # placed by another control plane: not timed
    got = samples(metrics)
    team = labels(team="vision")
    assert got[("jobworker_queue_wait_seconds_count", team)] == 1
    assert got[("jobworker_queue_wait_seconds_sum", team)] == 12.5
    assert got[("jobworker_dispatch_latency_seconds_count", team)] == 1
    assert got[("jobworker_dispatch_latency_seconds_sum", team)] == 3.0


def test_an_attempt_that_ends_before_running_is_not_timed() -> None:
    clock = FakeClock()
    metrics = SchedulerMetrics(clock)
    metrics.placed("j-1", "vision", queue_wait_s=1.0)
    metrics.ended("j-1")
    metrics.running("j-1", "vision")
    assert ("jobworker_dispatch_latency_seconds_count", labels(team="vision")) not in samples(
        metrics
    )


def test_placement_pass_time_counters_and_clock() -> None:
    clock = FakeClock()
    metrics = SchedulerMetrics(clock)
    with metrics.placement_pass():
        clock.now_s += 0.25
    metrics.preempted("vision")
    metrics.preempted("vision")
    metrics.retried("nlp", "lost")
    got = samples(metrics)
    assert got[("jobworker_placement_pass_seconds_count", labels())] == 1
    assert got[("jobworker_placement_pass_seconds_sum", labels())] == 0.25
    assert got[("jobworker_preemptions_total", labels(team="vision"))] == 2
    assert got[("jobworker_retries_total", labels(team="nlp", cause="lost"))] == 1
    assert ("jobworker_retries_total", labels(team="nlp", cause="failed")) not in got


def test_throttles_are_counted_per_team_and_deployment_beside_those_throttled_now() -> None:
    metrics = SchedulerMetrics(FakeClock())
    metrics.throttled("vision", "mlp")
    metrics.throttled("vision", "mlp")
    metrics.throttled_now(1)
    got = samples(metrics)
    assert got[("jobworker_throttles_total", labels(team="vision", deployment="mlp"))] == 2
    assert got[("jobworker_jobs_throttled", labels())] == 1
