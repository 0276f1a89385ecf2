"""Predicted durations and starts, live: real Ray, MLflow (SQLite), SQLite and HTTP.

A family run again is predicted from its earlier runs, and the prediction is on the
run in MLflow; the starts ``GET /queue`` and ``jobworker queue`` predict for a full
cluster order the queue the way its jobs then start.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from typer.testing import CliRunner

from scheduler.batch.store import JobStore
from scheduler.cli.main import app as cli
from scheduler.core.states import JobState
from tests.conftest import wait_until
from tests.integration.conftest import Api, entrypoint_yaml
from workers.interface.spec import load_spec

DONE = {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}


def submit(api: Api, text: str) -> str:
    response = api.http.post("/jobs", content=text, headers={"content-type": "application/yaml"})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def test_a_family_run_a_third_time_is_predicted_within_30_percent_of_its_run(
    make_api: Callable[..., Api],
) -> None:
    api = make_api()
    # Sleep-paced steps: most of its run is the same wall time whatever else loads the host.
    text = entrypoint_yaml("fam", "count_steps", gpus=1, gpu_memory_gb=2, steps=30, step_s=0.2)
    ids = []
    for _ in range(3):
        ids.append(submit(api, text))
        job = api.wait_for(ids[-1], DONE)
        assert job.state is JobState.SUCCEEDED, job.error
        api.plane.history.refresh()  # as its thread does every history_refresh_s

    first, second, third = (api.plane.store.get(i) for i in ids)
    runs = [api.mlflow().get_run(j.run_id or "").data.tags for j in (first, second, third)]
    assert "jobworker.predicted_duration_s" not in runs[0]  # nothing to predict from yet
    family = f"name:default/{third.submitted_by}/fam"
    assert [t.get("jobworker.prediction_basis") for t in runs[1:]] == [family, family]
    assert float(runs[1]["jobworker.predicted_duration_s"]) == pytest.approx(first.ran_s, abs=1e-3)
    predicted_s = float(runs[2]["jobworker.predicted_duration_s"])
    median_s = (first.ran_s + second.ran_s) / 2  # of two runs
    assert predicted_s == pytest.approx(median_s, abs=1e-3)
    assert abs(predicted_s - third.ran_s) <= 0.3 * third.ran_s, (predicted_s, third.ran_s)


class PastClock:
    """A clock in the past, moved forward by the test only."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def family(name: str) -> str:
    """A job of family ``name`` that holds both GPUs of the node for a moment."""
    return entrypoint_yaml(
        name, "count_steps", gpus=2, gpu_memory_gb=20, steps=3, step_s=0.05, family=name
    )


def ran_before(store: JobStore, clock: PastClock, text: str, ran_s: float, who: str) -> None:
    """A job of ``text`` that ran ``ran_s``, as predicted when it started (so its family's
    predictions are trusted by the predictive order)."""
    job_id = store.create(load_spec(text), text, submitted_by=who).id
    store.transition(job_id, JobState.SCHEDULED, "placed", predicted_s=ran_s)
    store.transition(job_id, JobState.RUNNING, "started")
    clock.now += ran_s
    store.transition(job_id, JobState.SUCCEEDED, "done")


def test_predicted_starts_order_the_queue_as_its_jobs_then_start(api: Api) -> None:
    blocker = submit(api, entrypoint_yaml("blocker", "run_until_stopped", gpus=2, gpu_memory_gb=20))
    api.wait_for(blocker, {JobState.RUNNING})
    who = api.plane.store.get(blocker).submitted_by or ""
    # The families' history, as if they had run before: quick 30 s, slow 300 s, as predicted.
    clock = PastClock()
    past = JobStore(api.plane.engine, clock=clock)
    for _ in range(3):
        ran_before(past, clock, family("quick"), 30.0, who)
        ran_before(past, clock, family("slow"), 300.0, who)
    api.plane.history.refresh()
    ids = [submit(api, family(name)) for name in ("slow", "quick", "slow")]

    def forecast() -> list[dict[str, Any]] | None:
        queue: list[dict[str, Any]] = api.http.get("/queue").json()
        known = len(queue) == 3 and all(e["predicted_start_at"] for e in queue)
        return queue if known else None

    queue = wait_until(forecast, "every waiting job has a predicted start", timeout_s=60)
    listed = [e["job_id"] for e in queue]
    starts = [e["predicted_start_at"] for e in queue]
    assert listed == [ids[1], ids[0], ids[2]]  # the quick family first, by prediction
    assert starts == sorted(starts) and len(set(starts)) == 3
    assert [e["predicted_duration_s"] for e in queue] == [30.0, 300.0, 300.0]
    assert queue[0]["prediction_basis"] == f"name:default/{who}/quick"

    job = api.http.get(f"/jobs/{ids[1]}").json()
    assert job["prediction"]["start_at"] == starts[0]
    assert job["prediction"]["samples"] == 3
    runner = CliRunner(env={"COLUMNS": "400"})
    where = ["--api", str(api.http.base_url), "--token", api.admin_token]
    shown = runner.invoke(cli, ["queue", *where])
    assert shown.exit_code == 0, shown.output
    assert [shown.output.index(j) for j in listed] == sorted(shown.output.index(j) for j in listed)
    assert shown.output.count("starts in ~") == 3
    status = runner.invoke(cli, ["status", ids[1], *where])
    assert status.exit_code == 0 and "estimate: starts in ~" in status.output, status.output
    assert "runs ~30 s" in status.output and "finishes ~" in status.output

    assert api.http.post(f"/jobs/{blocker}/cancel").status_code == 200
    ended = [api.wait_for(j, DONE) for j in ids]
    assert all(j.state is JobState.SUCCEEDED for j in ended), [j.error for j in ended]
    started = sorted(ended, key=lambda j: j.started_at or 0.0)
    assert [j.id for j in started] == listed
