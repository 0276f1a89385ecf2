"""ServingMetrics.summary: a model's recent requests/s, p50/p99, batch size and shed
count for the console, over a rolling window (a fake clock)."""

from __future__ import annotations

import pytest

from scheduler.realtime.metrics import ServingMetrics


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_no_traffic_reads_as_unknown_not_zero() -> None:
    summary = ServingMetrics(clock=Clock(), window_s=10).summary("mlp")
    assert summary.requests_per_s == 0
    assert summary.p50_ms is None and summary.p99_ms is None
    assert summary.mean_batch_size is None and summary.shed_total == 0


def test_percentiles_rate_and_batch_over_the_window() -> None:
    metrics = ServingMetrics(clock=Clock(), window_s=10)
    for ms in range(1, 101):  # 1..100 ms
        metrics.observe_latency("mlp", ms / 1000)
    metrics.observe_batch("mlp", 4)
    metrics.observe_batch("mlp", 8)
    metrics.observe_latency("other", 5.0)
    summary = metrics.summary("mlp")
    assert summary.requests_per_s == pytest.approx(10.0)
    assert summary.p50_ms == pytest.approx(50.0)
    assert summary.p99_ms == pytest.approx(99.0)
    assert summary.mean_batch_size == 6


def test_what_left_the_window_no_longer_counts() -> None:
    clock = Clock()
    metrics = ServingMetrics(clock=clock, window_s=10)
    metrics.observe_latency("mlp", 0.5)
    clock.now += 6
    metrics.observe_latency("mlp", 0.002)
    clock.now += 5  # the first is 11 s old, the second 5 s
    summary = metrics.summary("mlp")
    assert summary.p99_ms == pytest.approx(2.0)
    assert summary.requests_per_s == pytest.approx(0.1)


def test_shed_requests_are_counted_in_all() -> None:
    metrics = ServingMetrics(clock=Clock(), window_s=10)
    metrics.shed("mlp", "queue_full")
    metrics.shed("mlp", "slo")
    assert metrics.summary("mlp").shed_total == 2


def test_the_guards_p99_looks_back_only_its_own_shorter_window() -> None:
    clock = Clock()
    metrics = ServingMetrics(clock=clock, window_s=30)
    metrics.observe_latency("mlp", 0.5)
    clock.now += 10
    metrics.observe_latency("mlp", 0.002)
    assert metrics.recent_p99_ms("mlp", window_s=5) == pytest.approx(2.0)
    assert metrics.recent_p99_ms("mlp", window_s=20) == pytest.approx(500.0)
    assert metrics.recent_p99_ms("other", window_s=5) is None
