"""Training beside a replica on one node: pinned cores, and the SLO guard end to end.

Real Ray, MLflow, SQLite and HTTP; simulated GPUs. With thresholds a tiny
fraction of ``slo.p99_ms``, a deployment is over with any traffic at all, so the guard throttles
the training job on its node while traffic flows and releases it once traffic
stops (no traffic in the guard's window counts as recovered).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import torch

from scheduler.core.states import JobState
from scheduler.realtime.guard import THROTTLED
from tests.conftest import wait_until
from tests.integration.conftest import Api, entrypoint_yaml
from tests.integration.serving_helpers import (
    DIM,
    Traffic,
    deploy,
    deploy_yaml,
    log_model,
    wait_deployment,
)
from workers.cpu_control import node_cores, split_cores
from workers.interface.throttles import THROTTLED_METRIC, THROTTLES_TAG


def _submit(api: Api, text: str) -> str:
    r = api.http.post("/jobs", content=text, headers={"content-type": "application/yaml"})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _running_pid(api: Api, job_id: str) -> int:
    def known() -> int | None:
        job = api.plane.store.get(job_id)
        leader = job.assignment.leader if job.assignment else None
        ready = job.state is JobState.RUNNING and job.run_id is not None
        return leader.pid if ready and leader is not None else None

    return wait_until(known, f"{job_id} running with its pid and run", 120)


def _process_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _reasons(api: Api, job_id: str) -> list[str]:
    job = api.http.get(f"/jobs/{job_id}").json()
    return [e["reason"] for e in job["history"]]


def _metric(api: Api, pattern: str) -> float | None:
    text = api.http.get("/metrics").text
    match = re.search(pattern + r" ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def test_a_job_process_is_pinned_to_training_cores_away_from_the_serving_ones(
    make_api: Callable[..., Api],
) -> None:
    api = make_api()
    job_id = _submit(api, entrypoint_yaml("pinned", "run_until_stopped"))
    pid = _running_pid(api, job_id)
    serving, training = split_cores(node_cores(), 1)
    pinned = os.sched_getaffinity(pid)
    assert len(pinned) == 1 and pinned <= set(training)  # resources.cpus: 1
    if len(node_cores()) > 1:
        assert not pinned & set(serving)
    assert os.sched_getscheduler(pid) == os.SCHED_IDLE
    api.http.post(f"/jobs/{job_id}/cancel")
    api.wait_for(job_id, {JobState.CANCELLED})


def test_two_jobs_on_one_node_get_disjoint_cores(make_api: Callable[..., Api]) -> None:
    # No serving core: every core trains, so a 2-core machine has room for two 1-core jobs.
    api = make_api(serving_cores=0)
    jobs = [_submit(api, entrypoint_yaml(f"pair-{i}", "run_until_stopped")) for i in range(2)]
    pinned = [os.sched_getaffinity(_running_pid(api, job_id)) for job_id in jobs]
    assert all(len(cores) == 1 for cores in pinned)
    if len(node_cores()) >= 2:
        assert not pinned[0] & pinned[1]
    for job_id in jobs:
        api.http.post(f"/jobs/{job_id}/cancel")
    for job_id in jobs:
        api.wait_for(job_id, {JobState.CANCELLED})


def test_the_slo_guard_pauses_colocated_training_and_releases_it(
    make_api: Callable[..., Api],
) -> None:
    # Thresholds so low that any latency at all is over (a tiny slo.p99_ms would do the same,
    # but admission control would then refuse every request, leaving no latency to measure).
    api = make_api(slo_guard=True, guard_throttle_at=1e-9, guard_release_at=1e-9)
    log_model(api.tracking_uri, "guarded", torch.nn.Sequential(torch.nn.Linear(DIM, 4)))
    deploy(api, deploy_yaml("guarded", "models:/guarded/1"))
    wait_deployment(api, "guarded")
    job_id = _submit(api, entrypoint_yaml("beside", "run_until_stopped"))
    pid = _running_pid(api, job_id)
    run_id = api.plane.store.get(job_id).run_id
    assert run_id is not None and _process_state(pid) != "T"

    traffic = Traffic(api, "guarded").start()
    wait_until(lambda: _process_state(pid) == "T", "the guard pauses the job process", 60)
    wait_until(
        lambda: any(r.startswith(THROTTLED) for r in _reasons(api, job_id)),
        "the throttle in the job's history",
    )
    counted = r'jobworker_throttles_total\{deployment="guarded",team="[^"]*"\}'
    assert _metric(api, counted) == 1.0
    assert _metric(api, "jobworker_jobs_throttled") == 1.0
    results = traffic.stop()
    assert results and all(status == 200 for status, _, _ in results)

    wait_until(lambda: _process_state(pid) != "T", "the guard releases the job process", 60)
    assert api.plane.store.get(job_id).state is JobState.RUNNING
    assert any(r.startswith("released by the SLO guard") for r in _reasons(api, job_id))
    assert _metric(api, "jobworker_jobs_throttled") == 0.0

    def recorded() -> list[float] | None:
        client = api.mlflow()
        points = [m.value for m in client.get_metric_history(run_id, THROTTLED_METRIC)]
        tag = client.get_run(run_id).data.tags.get(THROTTLES_TAG)
        return points if tag == "1" and len(points) == 2 else None

    assert wait_until(recorded, "the throttle on the job's MLflow run") == [1.0, 0.0]

    # A paused job can still be cancelled: it is resumed before it is told to stop.
    traffic = Traffic(api, "guarded").start()
    wait_until(lambda: _process_state(pid) == "T", "the guard pauses the job again", 60)
    api.http.post(f"/jobs/{job_id}/cancel")
    job = api.wait_for(job_id, {JobState.CANCELLED, JobState.FAILED}, 120)
    traffic.stop()
    assert job.state is JobState.CANCELLED
