"""The lanes on real Ray: preemption for the real-time lane, retries after a lost worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray
import torch
from typer.testing import CliRunner

from scheduler.cli.main import app as cli
from scheduler.core.states import JobState
from tests.conftest import wait_until
from tests.integration.conftest import Api, entrypoint_yaml
from tests.integration.serving_helpers import deploy, deploy_yaml, log_model, wait_deployment


def _submit(api: Api, text: str) -> str:
    r = api.http.post("/jobs", content=text, headers={"content-type": "application/yaml"})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _wait_step(api: Api, job_id: str, step: int, timeout_s: float = 120) -> None:
    def reached() -> bool:
        job = api.plane.store.get(job_id)
        assert not job.terminal, (job.state, job.error)
        return (
            job.state is JobState.RUNNING and (job.progress.step or 0) >= step
            if job.progress
            else False
        )

    wait_until(reached, f"{job_id} reaches step {step}", timeout_s, every_s=0.2)


def _counted(api: Api, run_id: str) -> list[int]:
    history = api.mlflow().get_metric_history(run_id, "counted")
    return sorted(int(m.step) for m in history)


def test_deployment_preempts_lowest_priority_job_which_resumes_in_the_same_run(
    make_api: Any, tmp_path: Path
) -> None:
    api: Api = make_api()  # node "local": two 40 GB A100s, one with 8 GB held by another tenant
    steps, gate = 60, tmp_path / "go"  # low waits at step 30 until the test opens the gate
    low = _submit(
        api,
        entrypoint_yaml(
            "low", "count_steps", gpus=1, gpu_memory_gb=30, steps=steps, gate=str(gate),
            gate_step=30,
        )
        + "priority: -10\n",
    )  # fmt: skip
    high = _submit(  # runs until cancelled
        api,
        entrypoint_yaml("high", "run_until_stopped", gpus=1, gpu_memory_gb=30) + "priority: 10\n",
    )
    _wait_step(api, low, 12)
    _wait_step(api, high, 1)
    log_model(api.tracking_uri, "big", torch.nn.Sequential(torch.nn.Linear(64, 10)))
    deploy(api, deploy_yaml("big", "models:/big/1", resources="{gpu_memory_gb: 20, cpus: 1}"))

    preempted = api.wait_for(low, {JobState.PENDING, JobState.PREEMPTED}, 120)
    events = [e.to_state for e in api.plane.store.history(low)]
    assert JobState.PREEMPTED in events
    assert "real-time replica" in next(
        e.reason for e in api.plane.store.history(low) if e.to_state is JobState.PREEMPTED
    )
    assert preempted.attained_gpu_s > 0 and preempted.queued_at > preempted.submitted_at
    stopped_at = max(_counted(api, str(preempted.run_id)))
    running = api.plane.store.get(high)  # the higher priority job runs on, never preempted
    assert running.state is JobState.RUNNING and running.preemptions == 0
    wait_deployment(api, "big")

    # Capacity comes back when the deployment goes; the job resumes where it stopped.
    assert api.http.delete("/deployments/big").status_code == 204
    gate.touch()
    done = api.wait_for(low, {JobState.SUCCEEDED, JobState.FAILED}, 180)
    assert done.state is JobState.SUCCEEDED, done.error
    assert done.run_id == preempted.run_id and done.preemptions == 1
    counted = _counted(api, str(done.run_id))
    assert counted[-1] == steps
    assert set(range(1, steps + 1)) <= set(counted)
    # Resumed from its last checkpoint: at most the steps since it were counted twice.
    assert len(counted) - steps <= 5 and stopped_at < steps
    run = api.mlflow().get_run(str(done.run_id))
    assert run.data.tags["jobworker.preemptions"] == "1"
    assert "real-time replica" in run.data.tags["jobworker.resume.2"]
    runs = api.mlflow().search_runs(
        [run.info.experiment_id], filter_string=f"tags.`jobworker.job_id` = '{low}'"
    )
    assert len(runs) == 1
    assert JobState.PREEMPTED not in [e.to_state for e in api.plane.store.history(high)]
    api.http.post(f"/jobs/{high}/cancel")
    api.wait_for(high, {JobState.CANCELLED}, 60)


def test_a_lost_worker_is_requeued_without_counting_and_resumes(
    make_api: Any, tmp_path: Path
) -> None:
    api: Api = make_api()
    steps, gate = 40, tmp_path / "go"  # it waits at step 20 until the worker has been killed
    text = entrypoint_yaml("lost", "count_steps", steps=steps, gate=str(gate), gate_step=20)
    job_id = _submit(api, text)  # max_retries 0: a loss is not the job's fault
    _wait_step(api, job_id, 12)
    ray.kill(ray.get_actor(f"jobworker-train-{job_id}", namespace=api.namespace))
    gate.touch()

    done = api.wait_for(job_id, {JobState.SUCCEEDED, JobState.FAILED}, 180)
    assert done.state is JobState.SUCCEEDED, done.error
    history = api.plane.store.history(job_id)
    retry = next(e for e in history if e.to_state is JobState.PENDING and e.from_state)
    assert "lost: worker lost" in retry.reason and "not counted" in retry.reason
    assert (done.attempts, done.losses, done.failures) == (2, 1, 0)
    counted = _counted(api, str(done.run_id))
    assert counted[-1] == steps and len(counted) - steps <= 5  # resumed, not restarted
    assert [e.to_state for e in history].count(JobState.SUCCEEDED) == 1


def test_a_user_exception_is_retried_up_to_max_retries_then_fails(make_api: Any) -> None:
    api: Api = make_api()
    job_id = _submit(api, entrypoint_yaml("boom", "explode") + "max_retries: 1\n")
    done = api.wait_for(job_id, {JobState.SUCCEEDED, JobState.FAILED}, 120)
    assert done.state is JobState.FAILED
    assert (done.attempts, done.failures, done.losses) == (2, 2, 0)
    history = api.plane.store.history(job_id)
    assert any("retry 1 of 1" in e.reason for e in history)
    assert "Traceback" in api.http.get(f"/jobs/{job_id}/logs").json()["text"]


def test_queue_shows_the_order_and_reasons_and_jobs_start_in_it(make_api: Any) -> None:
    api: Api = make_api()
    blockers = [
        _submit(api, entrypoint_yaml(f"block{i}", "run_until_stopped", gpus=1, gpu_memory_gb=30))
        for i in range(2)
    ]
    for job_id in blockers:
        api.wait_for(job_id, {JobState.RUNNING}, 120)
    low = _submit(api, entrypoint_yaml("later", "explode", gpus=1, gpu_memory_gb=30))
    high = _submit(
        api, entrypoint_yaml("urgent", "explode", gpus=1, gpu_memory_gb=30) + "priority: 5\n"
    )

    def ordered() -> list[dict[str, Any]] | None:
        queue: list[dict[str, Any]] = api.http.get("/queue").json()
        ids = [e["job_id"] for e in queue]
        return queue if ids == [high, low] and all(e["reasons"] for e in queue) else None

    queue = wait_until(ordered, f"the queue shows {high} then {low}, with reasons", 30)
    assert [e["position"] for e in queue] == [1, 2]
    assert all("GiB" in " ".join(e["reasons"]) or "GPU" in " ".join(e["reasons"]) for e in queue)
    shown = CliRunner().invoke(
        cli, ["queue", "--api", str(api.http.base_url), "--home", str(api.home)]
    )
    assert shown.exit_code == 0 and shown.output.index("urgent") < shown.output.index("later")

    api.http.post(f"/jobs/{blockers[0]}/cancel")  # one GPU frees: the higher priority goes
    started = api.wait_for(high, {JobState.SCHEDULED, JobState.RUNNING, JobState.FAILED}, 60)
    assert started.state is not JobState.PENDING
    assert api.plane.store.get(low).state is JobState.PENDING
    api.http.post(f"/jobs/{blockers[1]}/cancel")
    api.wait_for(low, {JobState.FAILED}, 120)
    assert api.http.get("/queue").json() == []
