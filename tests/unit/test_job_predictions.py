"""Predictions of live jobs, without the store: each job's family, the time it has run, the
policy's inputs carrying the estimates, the forecast of a pass, and the CLI's wording."""

from __future__ import annotations

import dataclasses
from datetime import UTC
from typing import Any

import pytest

from scheduler.batch.demands import queued_job, running_job
from scheduler.batch.history import elapsed_s, family_keys
from scheduler.batch.predictions import Forecaster, ForecastInputs, job_predictions
from scheduler.batch.store import JobRecord
from scheduler.cli.estimates import (
    NO_ESTIMATE,
    clock_text,
    estimate_text,
    run_text,
    span_text,
    start_text,
)
from scheduler.core.model import QueuedJob, QueuePolicy, RunningJob
from scheduler.core.predictor import Prediction
from scheduler.core.states import JobState
from tests.unit.job_records import pending_record
from workers.interface.executor import Assignment, NodeAssignment
from workers.interface.telemetry import GpuUuid

TEXT = (
    "name: {name}\nteam: vision\nmodel: {{name: mlp}}\n"
    "train: {{max_steps: 10, lr: {lr}}}\n"
    "resources: {{gpus: {gpus}, gpu_memory_gb: 1}}\npriority: {priority}\n"
)


def make_job(
    name: str = "sweep",
    *,
    lr: float = 0.01,
    gpus: int = 1,
    priority: int = 0,
    **fields: Any,
) -> JobRecord:
    text = TEXT.format(name=name, lr=lr, gpus=gpus, priority=priority)
    base = pending_record(text, f"j-{name}", submitted_at=100.0)
    return dataclasses.replace(base, **fields)


ON_GPU = Assignment(
    nodes=(NodeAssignment(node_id="n1", hostname="a", gpu_indices=(0,), gpu_uuids=(GpuUuid("g"),)),)
)


# -- families ----------------------------------------------------------------------------


def test_a_family_is_name_then_work_then_team_then_cluster() -> None:
    keys = family_keys(make_job())
    assert keys[0] == "name:vision/sweep"
    assert keys[1].startswith("work:vision/")
    assert keys[2:] == ("team:vision", "cluster")


def test_size_priority_and_name_do_not_change_the_work_but_its_options_do() -> None:
    work = family_keys(make_job())[1]
    assert family_keys(make_job("other", gpus=4, priority=7))[1] == work
    assert family_keys(make_job(lr=0.1))[1] != work


def test_the_submitter_narrows_the_name_key_when_the_store_knows_it() -> None:
    assert family_keys(make_job(submitted_by="ana"))[0] == "name:vision/ana/sweep"
    assert family_keys(make_job(submitted_by="ana"))[1:] == family_keys(make_job())[1:]


def test_elapsed_counts_ended_attempts_and_the_current_one() -> None:
    assert elapsed_s(make_job(ran_s=40.0), now=500.0) == 40.0  # pending: nothing runs
    running = make_job(ran_s=40.0, state=JobState.RUNNING, attempt_started_at=450.0)
    assert elapsed_s(running, now=500.0) == 90.0


# -- the policy's inputs -----------------------------------------------------------------


def test_queued_and_running_jobs_carry_the_estimates_the_loop_hands_them() -> None:
    assert queued_job(make_job()).est_duration_s is None
    assert queued_job(make_job(), remaining_s=120.0).est_duration_s == 120.0
    running = make_job(state=JobState.RUNNING, attempt_started_at=450.0, assignment=ON_GPU)
    r = running_job(running, est_end=900.0)
    assert r is not None and (r.est_end, r.started_at) == (900.0, 450.0)


# -- the forecast of a pass --------------------------------------------------------------


def prediction(duration_s: float, basis: str = "name:vision/x") -> Prediction:
    return Prediction(duration_s, duration_s - 10, duration_s + 30, None, basis, 3)


def inputs(**changes: Any) -> ForecastInputs:
    """One node of 2 GPUs, held by ``r`` (started at 0, 50 s left); ``a`` and ``b`` wait for
    both GPUs; ``a`` runs 100 s, ``b`` has no history."""
    base = ForecastInputs(
        pending=[
            QueuedJob("a", "t", 0, gpus=2, submitted_at=1.0, est_duration_s=100.0),
            QueuedJob("b", "t", 0, gpus=2, submitted_at=2.0),
        ],
        running=[RunningJob("r", "t", 0, gpus=2, node_ids=("n1",), started_at=0.0, est_end=60.0)],
        node_gpus={"n1": 2},
        policy=QueuePolicy(mode="las"),
        now=10.0,
        started_at={"r": 0.0},
        predictions={"a": prediction(100.0), "r": prediction(60.0)},
        remaining_s={"a": 100.0, "r": 50.0},
        unknown_s=None,
    )
    return dataclasses.replace(base, **changes)


def test_each_waiting_job_gets_the_start_the_queue_simulated_forward_gives_it() -> None:
    out = job_predictions(inputs())
    assert (out["r"].start_at, out["r"].end_at) == (0.0, 60.0)
    assert (out["a"].start_at, out["a"].end_at) == (60.0, 160.0)
    assert out["a"].basis == "name:vision/x" and out["a"].spread_s == 20.0
    # b has no history of its own: its start is known (after a), its end is not
    assert out["b"].start_at == 160.0
    assert (out["b"].end_at, out["b"].duration_s, out["b"].samples) == (None, None, 0)


def test_the_cluster_median_stands_in_for_jobs_without_history() -> None:
    pending = [
        QueuedJob("b", "t", 0, gpus=2, submitted_at=0.5),
        QueuedJob("a", "t", 0, gpus=2, submitted_at=1.0, est_duration_s=100.0),
    ]
    out = job_predictions(inputs(pending=pending, policy=QueuePolicy(), unknown_s=30.0))
    assert out["a"].start_at == 60.0 + 30.0  # after r, then b's 30 s


def test_nothing_is_forecast_while_no_job_has_a_prediction() -> None:
    out = job_predictions(inputs(predictions={}, remaining_s={}))
    assert out["a"].start_at is None and out["a"].samples == 0
    assert out["r"].start_at == 0.0  # a running job's start is a fact


def test_a_start_beyond_the_horizon_is_unknown_not_infinite() -> None:
    out = job_predictions(inputs(node_gpus={"n1": 1}, running=[], started_at={}))
    assert out["a"].start_at is None and out["a"].end_at is None  # never fits on 1 GPU


def test_a_running_job_without_gpus_ends_after_its_time_left() -> None:
    out = job_predictions(inputs(started_at={"r": 0.0, "cpu": 5.0}, remaining_s={"cpu": 7.0}))
    assert out["cpu"].start_at == 5.0 and out["cpu"].end_at is None  # no prediction: no end
    out = job_predictions(
        inputs(
            started_at={"r": 0.0, "cpu": 5.0},
            predictions={"cpu": prediction(12.0)},
            remaining_s={"cpu": 7.0, "r": 50.0},
        )
    )
    assert out["cpu"].end_at == 17.0


def test_the_forecaster_keeps_the_latest_forecast_until_the_next() -> None:
    forecaster = Forecaster()
    assert forecaster.prediction("a") is None
    forecaster.submit(inputs())
    forecaster.run_once()
    first = forecaster.prediction("a")
    assert first is not None and first.start_at == 60.0
    forecaster.run_once()  # nothing new submitted: the last forecast stays
    assert forecaster.prediction("a") == first


# -- the CLI's words ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(45, "45 s"), (12 * 60, "12 min"), (3 * 3600, "3 h"), (9000, "2.5 h"), (3 * 86400, "3 d")],
)
def test_spans_read_as_people_say_them(seconds: float, text: str) -> None:
    assert span_text(seconds) == text


def test_starts_and_run_times_in_words() -> None:
    assert start_text(1720.0, 1000.0) == "starts in ~12 min"
    assert start_text(1000.5, 1000.0) == "should start now"
    assert start_text(None, 1000.0).startswith("no start")
    assert run_text(1200.0, 240.0) == "runs ~20 min (±4)"
    assert run_text(1200.0, None) == "runs ~20 min"


def test_finish_times_show_the_date_only_when_not_today() -> None:
    now = 1_764_930_000.0  # 2025-12-05 10:20 UTC
    assert clock_text(now + 45 * 60, now, UTC) == "11:05"
    assert clock_text(now + 86400, now, UTC) == "Dec 06 10:20"


def test_a_job_without_history_says_so() -> None:
    assert estimate_text(None, 0.0) == NO_ESTIMATE
    running = {"samples": 3, "start_at": 0.0, "end_at": 3900.0, "duration_s": 3900.0}
    assert estimate_text({**running, "spread_s": 600.0}, 0.0, UTC) == (
        "runs ~65 min (±10), finishes ~01:05"
    )
    pending = {**running, "start_at": 720.0, "spread_s": None}
    assert estimate_text(pending, 0.0, UTC).startswith("starts in ~12 min, runs ~65 min")
