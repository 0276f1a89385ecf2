"""What MLflow knows about finished runs (``workers.mlflow_history``), against a real MLflow on
SQLite; and the tags the real job runner leaves at a run's end for it (and for review)."""

from __future__ import annotations

import logging
import re
import signal
from pathlib import Path

import pytest
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from tests.integration.conftest import entrypoint_yaml, free_port
from tests.integration.job_process import start_job
from workers.interface.history import ACTUAL_DURATION_TAG, PEAK_GPU_MEMORY_TAG, RunFacts
from workers.interface.telemetry import GIB
from workers.mlflow_history import MlflowRunFacts

T0_MS = 1_700_000_000_000


def log_run(
    client: MlflowClient,
    experiment: str,
    points: dict[str, list[tuple[int, int, float]]],
    tags: dict[str, str] | None = None,
    end: bool = True,
) -> str:
    """A run in ``experiment`` with metric ``key``'s ``(step, timestamp_ms, value)`` points."""
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run_id = str(client.create_run(experiment_id).info.run_id)
    metrics = [Metric(k, v, t, s) for k, ps in points.items() for s, t, v in ps]
    client.log_batch(run_id, metrics=metrics, tags=[RunTag(k, v) for k, v in (tags or {}).items()])
    if end:
        client.set_terminated(run_id, "FINISHED")
    return run_id


def steady(steps: range, every_ms: int, start_ms: int = T0_MS) -> list[tuple[int, int, float]]:
    return [(s, start_ms + i * every_ms, 1.0 / s) for i, s in enumerate(steps)]


@pytest.fixture
def mlflow_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/mlflow.db"


def test_facts_come_from_the_peak_tag_system_metrics_and_step_timestamps(mlflow_uri: str) -> None:
    client = MlflowClient(mlflow_uri)
    # 10 steps/s over steps 1-50, a 10-minute pause (preempted, queued), 10 steps/s again.
    preempted = steady(range(1, 51), 100) + steady(range(51, 101), 100, T0_MS + 600_000)
    tagged = log_run(
        client, "a", {"loss": preempted, "accuracy": preempted}, {PEAK_GPU_MEMORY_TAG: "7.25"}
    )
    # No tag: the largest system-metrics reading of any GPU; no `loss`: its one metric's steps.
    system = log_run(
        client,
        "b",
        {
            "counted": steady(range(10, 110, 10), 2000),  # 10 steps every 2 s
            "system/gpu_0_memory_usage_megabytes": [(0, T0_MS, 1000.0), (1, T0_MS, 4000.0)],
            "system/gpu_1_memory_usage_megabytes": [(0, T0_MS, 3000.0), (1, T0_MS, 9000.0)],
            "system/cpu_utilization_percentage": [(0, T0_MS, 99999.0)],
        },
    )
    bare = log_run(client, "b", {"loss": [(1, T0_MS, 1.0)]})  # one point: no rate

    reader = MlflowRunFacts(mlflow_uri)
    missing = "0" * 32
    facts = reader.read([tagged, system, bare, missing, "not a run id"])

    assert facts == {
        tagged: RunFacts(tagged, 7.25, pytest.approx(10.0)),
        system: RunFacts(system, pytest.approx(9000 * 1e6 / GIB), pytest.approx(5.0)),
        bare: RunFacts(bare, None, None),
    }


def test_a_finished_run_is_read_once_and_a_running_one_each_time(mlflow_uri: str) -> None:
    client = MlflowClient(mlflow_uri)
    finished = log_run(client, "a", {"loss": steady(range(1, 11), 100)}, {PEAK_GPU_MEMORY_TAG: "2"})
    running = log_run(client, "a", {"loss": steady(range(1, 11), 100)}, end=False)
    reader = MlflowRunFacts(mlflow_uri)
    assert reader.read([finished, running])[running].peak_gpu_memory_gb is None

    client.set_tag(finished, PEAK_GPU_MEMORY_TAG, "5")  # nothing a finished run would do
    client.set_tag(running, PEAK_GPU_MEMORY_TAG, "3")
    again = reader.read([finished, running])
    assert again[finished].peak_gpu_memory_gb == 2.0  # from the cache
    assert again[running].peak_gpu_memory_gb == 3.0  # read afresh


def test_an_outage_is_logged_and_answered_with_what_is_known(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    uri = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    with caplog.at_level(logging.WARNING, logger="workers.mlflow_history"):
        assert MlflowRunFacts(uri).read(["a" * 32]) == {}
    assert f"run facts: MLflow at {uri} did not answer" in caplog.text
    assert "0 of 1 runs known" in caplog.text


def test_the_job_runner_tags_the_jobs_run_time_over_its_attempts(
    tmp_path: Path, mlflow_uri: str
) -> None:
    """Attempt 1 is stopped (a preemption), attempt 2 resumes and finishes: the run's
    ``jobworker.actual_duration_s`` is the sum of both; on CPU there is no peak to tag."""
    gate = tmp_path / "gate"
    text = entrypoint_yaml("facts", "count_steps", steps=8, step_s=0.3, gate=str(gate), gate_step=3)
    job_dir = tmp_path / "job-facts"
    first = start_job(job_dir / "attempt-1", text, mlflow_uri)
    try:
        first.wait_for_step(3)  # steps 0.3 s apart: each one reaches progress.json
        first.proc.send_signal(signal.SIGTERM)
        assert first.finish() == 0, first.output()
    finally:
        first.kill()
    assert first.result()["status"] == "stopped", first.output()
    run_id = first.result()["run_id"]
    client = MlflowClient(mlflow_uri)
    tags = client.get_run(run_id).data.tags
    assert tags["jobworker.outcome"] == "stopped"
    first_s = float(tags[ACTUAL_DURATION_TAG])
    assert first_s > 0
    assert PEAK_GPU_MEMORY_TAG not in tags  # no CUDA in a job without GPUs

    gate.touch()
    second = start_job(job_dir / "attempt-2", text, mlflow_uri, attempt=2, run_id=run_id)
    try:
        assert second.finish() == 0, second.output()
    finally:
        second.kill()
    assert second.result()["status"] == "succeeded", second.output()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["jobworker.outcome"] == "succeeded"
    ran = re.search(r"jobworker: ran ([0-9.]+) s this attempt", second.output())
    assert ran is not None, second.output()
    total_s = float(run.data.tags[ACTUAL_DURATION_TAG])
    assert total_s == pytest.approx(first_s + float(ran[1]), abs=0.15)  # both attempts' time
    assert PEAK_GPU_MEMORY_TAG not in run.data.tags

    facts = MlflowRunFacts(mlflow_uri).read([run_id])[run_id]
    assert facts.peak_gpu_memory_gb is None
    assert facts.steps_per_s is not None and facts.steps_per_s > 0
