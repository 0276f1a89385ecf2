"""The forecast: the queue simulated forward gives each job a predicted start and end.

Pure: hand-made queues on small clusters, and a property test against the
queue policy's own ``plan`` (what it orders now is what the forecast starts now).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.core.model import QueuedJob, QueuePolicy, RunningJob
from scheduler.core.queue_policy import plan
from scheduler.sim.forecast import Forecast, forecast

FIFO = QueuePolicy(mode="fifo", aging_s_per_priority=None, preemption=False)
NOW = 1000.0


def q(job_id: str, gpus: int = 1, *, at: float = 0.0, prio: int = 0, **kw: Any) -> QueuedJob:
    return QueuedJob(job_id, "t", prio, gpus, submitted_at=at, **kw)


def r(job_id: str, node: str, gpus: int = 1, *, at: float = 0.0, **kw: Any) -> RunningJob:
    return RunningJob(job_id, "t", 0, gpus, (node,), started_at=at, **kw)


def test_an_empty_cluster_starts_everything_now() -> None:
    pending = [q("a", 2), q("b", 4, at=1.0)]
    out = forecast(pending, [], {"n1": 8}, FIFO, NOW, {"a": 60.0, "b": 30.0})
    assert out == {"a": Forecast(NOW, NOW + 60.0), "b": Forecast(NOW, NOW + 30.0)}


def test_fifo_on_one_node_chains_starts_on_predicted_ends() -> None:
    running = [r("r", "n1", 8, at=900.0)]
    pending = [q("a", 8, at=1.0), q("b", 8, at=2.0), q("c", 8, at=3.0)]
    remaining = {"r": 100.0, "a": 50.0, "b": 200.0, "c": 10.0}
    out = forecast(pending, running, {"n1": 8}, FIFO, NOW, remaining)
    assert out["r"] == Forecast(900.0, NOW + 100.0)
    assert out["a"] == Forecast(NOW + 100.0, NOW + 150.0)
    assert out["b"] == Forecast(NOW + 150.0, NOW + 350.0)
    assert out["c"] == Forecast(NOW + 350.0, NOW + 360.0)


def test_higher_priority_is_forecast_before_an_older_job() -> None:
    running = [r("r", "n1", 8)]
    pending = [q("old", 8, at=1.0), q("urgent", 8, at=500.0, prio=1)]
    out = forecast(pending, running, {"n1": 8}, FIFO, NOW, {"r": 100.0, "old": 50, "urgent": 70})
    assert out["urgent"].start_at == NOW + 100.0
    assert out["old"].start_at == NOW + 170.0


def test_a_gang_on_two_nodes_waits_for_both() -> None:
    running = [r("r1", "n1", 8), r("r2", "n2", 8)]
    pending = [q("gang", 8, nodes=2)]
    remaining = {"r1": 100.0, "r2": 300.0, "gang": 60.0}
    out = forecast(pending, running, {"n1": 8, "n2": 8}, FIFO, NOW, remaining)
    assert out["gang"] == Forecast(NOW + 300.0, NOW + 360.0)


def test_backfill_starts_a_short_job_early_without_delaying_the_head() -> None:
    # r holds 6 of 8 GPUs until +100; the head needs all 8; "small" fits in the 2 free.
    running = [r("r", "n1", 6, est_end=NOW + 100.0)]
    head = q("head", 8, at=1.0, est_duration_s=500.0)
    remaining = {"r": 100.0, "head": 500.0, "small": 80.0}
    alone = forecast([head], running, {"n1": 8}, FIFO, NOW, remaining)
    small = q("small", 2, at=2.0, est_duration_s=80.0)
    both = forecast([head, small], running, {"n1": 8}, FIFO, NOW, remaining)
    assert both["small"] == Forecast(NOW, NOW + 80.0)
    assert both["head"] == alone["head"] == Forecast(NOW + 100.0, NOW + 600.0)
    # Without estimates the policy cannot tell it is short: it waits behind the head.
    blind = forecast([q("head", 8, at=1.0), q("small", 2, at=2.0)], running, {"n1": 8}, FIFO,
                     NOW, remaining)  # fmt: skip
    assert blind["small"].start_at == NOW + 600.0


def test_a_job_without_a_prediction_runs_unknown_s_and_has_no_end() -> None:
    running = [r("r", "n1", 8)]
    pending = [q("a", 8, at=1.0), q("b", 8, at=2.0)]
    out = forecast(pending, running, {"n1": 8}, FIFO, NOW, {"a": 50.0}, unknown_s=400.0)
    assert out["r"] == Forecast(0.0, None)
    assert out["a"] == Forecast(NOW + 400.0, NOW + 450.0)
    assert out["b"] == Forecast(NOW + 450.0, None)


def test_a_job_not_started_within_the_horizon_starts_at_inf() -> None:
    running = [r("r", "n1", 8)]
    pending = [q("a", 8, at=1.0), q("b", 8, at=2.0)]
    remaining = {"r": 100.0, "a": 1000.0, "b": 10.0}
    out = forecast(pending, running, {"n1": 8}, FIFO, NOW, remaining, horizon_s=500.0)
    assert out["a"] == Forecast(NOW + 100.0, NOW + 1100.0)
    assert out["b"] == Forecast(math.inf, math.inf)


def test_a_job_that_never_fits_starts_at_inf_and_blocks_nobody() -> None:
    pending = [q("huge", 16, at=1.0), q("a", 8, at=2.0)]
    out = forecast(pending, [], {"n1": 8}, FIFO, NOW, {"huge": 10.0, "a": 10.0})
    assert out["huge"] == Forecast(math.inf, math.inf)
    assert out["a"] == Forecast(NOW, NOW + 10.0)


def test_las_preemption_moves_a_running_jobs_end_later() -> None:
    las = QueuePolicy(
        mode="las", aging_s_per_priority=None, las_thresholds_gpu_s=(3600.0,), min_run_s=0.0
    )
    # "old" has attained more than the first queue's limit: the new job preempts it.
    running = [r("old", "n1", 8, at=NOW - 100.0, attained_gpu_s=8 * 3600.0)]
    remaining = {"old": 500.0, "new": 200.0}
    alone = forecast([], running, {"n1": 8}, las, NOW, remaining)
    assert alone["old"] == Forecast(NOW - 100.0, NOW + 500.0)
    out = forecast([q("new", 8, at=NOW - 1.0)], running, {"n1": 8}, las, NOW, remaining,
                   restart_s=30.0, checkpoint_every_s=60.0)  # fmt: skip
    assert out["new"] == Forecast(NOW, NOW + 200.0)
    # It resumes after "new" from its last checkpoint (60 s of its 100 s kept), plus a restart.
    assert out["old"] == Forecast(NOW - 100.0, NOW + 200.0 + 30.0 + (600.0 - 60.0))


def test_duplicate_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="twice"):
        forecast([q("a")], [r("a", "n1")], {"n1": 8}, FIFO, NOW, {})


# --------------------------------------------------------------------------- against plan()


@st.composite
def queues(
    draw: st.DrawFn,
) -> tuple[dict[str, int], list[RunningJob], list[QueuedJob], QueuePolicy, dict[str, float]]:
    node_gpus = {f"n{i}": draw(st.sampled_from([4, 8])) for i in range(draw(st.integers(1, 3)))}
    free = dict(node_gpus)
    running: list[RunningJob] = []
    remaining: dict[str, float] = {}
    for i in range(draw(st.integers(0, 8))):
        node = draw(st.sampled_from(sorted(node_gpus)))
        if free[node] == 0:
            continue
        gpus = draw(st.integers(1, free[node]))
        free[node] -= gpus
        job_id = f"r{i}"
        running.append(
            RunningJob(job_id, draw(st.sampled_from("ab")), draw(st.integers(0, 1)), gpus,
                       (node,), draw(st.floats(0.0, NOW - 1.0)),
                       attained_gpu_s=draw(st.floats(0.0, 5000.0)),
                       est_end=draw(st.one_of(st.none(), st.floats(NOW + 1.0, NOW + 3000.0))))
        )  # fmt: skip
        remaining[job_id] = draw(st.floats(1.0, 3000.0))
    pending = []
    for i in range(draw(st.integers(1, 10))):
        job_id = f"p{i}"
        pending.append(
            QueuedJob(job_id, draw(st.sampled_from("ab")), draw(st.integers(0, 1)),
                      draw(st.sampled_from([1, 2, 4, 8])), submitted_at=draw(st.floats(0, NOW)),
                      nodes=draw(st.sampled_from([1, 1, 2])),
                      attained_gpu_s=draw(st.sampled_from([0.0, 2000.0])),
                      est_duration_s=draw(st.one_of(st.none(), st.floats(1.0, 3000.0))))
        )  # fmt: skip
        if draw(st.booleans()):
            remaining[job_id] = draw(st.floats(1.0, 3000.0))
    policy = QueuePolicy(
        mode=draw(st.sampled_from(["fifo", "sjf", "las"])),
        backfill=draw(st.booleans()),
        preemption=draw(st.booleans()),
        quotas=draw(st.sampled_from([{}, {"a": 4, "b": 8}])),
        aging_s_per_priority=draw(st.sampled_from([None, 300.0])),
        las_thresholds_gpu_s=(1500.0,),
        min_run_s=draw(st.sampled_from([0.0, 400.0])),
    )
    return node_gpus, running, pending, policy, remaining


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(queues())
def test_what_plan_orders_now_is_what_the_forecast_starts_now(
    case: tuple[dict[str, int], list[RunningJob], list[QueuedJob], QueuePolicy, dict[str, float]],
) -> None:
    node_gpus, running, pending, policy, remaining = case
    now_plan = plan(pending, running, node_gpus, policy, NOW)
    out = forecast(pending, running, node_gpus, policy, NOW, remaining, unknown_s=700.0)
    assert set(out) == {j.job_id for j in pending} | {j.job_id for j in running}
    assert {j.job_id for j in pending if out[j.job_id].start_at == NOW} == set(now_plan.order)
    for j in pending:
        f = out[j.job_id]
        assert f.start_at >= NOW
        assert f.end_at is None or f.end_at >= f.start_at + remaining[j.job_id]
    for rj in running:
        f = out[rj.job_id]
        assert f.start_at == rj.started_at
        preempted = rj.job_id in now_plan.preempt
        if f.end_at is not None and not preempted:
            assert f.end_at >= NOW + remaining[rj.job_id]
