"""The console over a whole control plane (real Ray, MLflow, SQLite, HTTP): the GPU map
and ``GET /cluster`` show the shares a running job, a replica and an outside process
hold; the deployments pages show the replica and its p99; cancel from the job page."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import torch

from scheduler.core.states import JobState
from tests.conftest import wait_until
from tests.integration.conftest import TRAIN_YAML, Api
from tests.integration.serving_helpers import deploy, deploy_yaml, log_model, rows, wait_deployment
from workers.interface.telemetry import GIB

DONE = {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}


def local_gpus(api: Api) -> list[dict[str, Any]]:
    nodes = api.http.get("/cluster").json()["nodes"]
    return list(next(n for n in nodes if n["hostname"] == "local")["gpus"])


def holders(api: Api) -> dict[int, list[dict[str, Any]]]:
    return {g["index"]: g["holders"] for g in local_gpus(api)}


def test_gpu_map_deployments_and_cancel_through_the_console(make_api: Callable[..., Api]) -> None:
    api = make_api()
    log_model(api.tracking_uri, "console-mlp", torch.nn.Sequential(torch.nn.Linear(64, 10)))
    deploy(api, deploy_yaml("console-mlp", "models:/console-mlp/1", resources="{gpu_memory_gb: 2}"))
    (replica,) = wait_deployment(api, "console-mlp")["replicas"]
    text = TRAIN_YAML.format(
        name="console-job", experiment="console", steps=100_000, gpus=1, gpu_memory_gb=3,
        register_as="console-job",
    )  # fmt: skip
    job_id = api.http.post("/jobs", content=text, headers={"content-type": "application/yaml"})
    job_id = job_id.json()["id"]
    job = api.wait_for(job_id, {JobState.RUNNING})
    assert job.assignment is not None and job.assignment.nodes[0].hostname == "local"
    assert replica["node"] == "local"
    job_gpu = job.assignment.nodes[0].gpu_indices[0]

    # GET /cluster: who holds what, per GPU (the CLI's `cluster` and `top` read this).
    shares = holders(api)
    assert {"kind": "job", "id": job_id, "memory_bytes": 3 * GIB} in shares[job_gpu]
    replica_share = {"kind": "replica", "id": "console-mlp", "memory_bytes": 2 * GIB}
    assert replica_share in shares[replica["gpu_indices"][0]]
    assert local_gpus(api)[replica["gpu_indices"][0]]["replicas"] == ["console-mlp"]
    # GPU 1 is shared with 8 GB of a process outside jobworker (configs/cluster/local_sim.yaml)
    wait_until(
        lambda: any(h["kind"] == "outside" for h in holders(api)[1]), "the outside share", 30
    )

    for _ in range(3):
        answer = api.http.post("/v1/models/console-mlp/predict", json={"inputs": rows(2)})
        assert answer.status_code == 200, answer.text
    link = api.http.post("/ui/links").json()["path"]
    browser = httpx.Client(base_url=str(api.http.base_url), timeout=30, follow_redirects=True)
    gpu_map = browser.get(link).text  # the login lands on the GPU map
    assert '<section class="node" data-node="local">' in gpu_map
    assert f'data-holder="job:{job_id}" data-bytes="{3 * GIB}"' in gpu_map
    assert f'data-holder="replica:console-mlp" data-bytes="{2 * GIB}"' in gpu_map
    assert 'data-holder="outside"' in gpu_map

    listing = browser.get("/ui/deployments").text
    assert '<tr data-deployment="console-mlp">' in listing
    p99 = listing.split('<td class="p99', 1)[1].split("</td>", 1)[0]
    assert float(p99.split(">", 1)[1]) > 0  # three predictions were timed
    page = browser.get("/ui/deployments/console-mlp").text
    assert f'<tr data-replica="{replica["id"]}">' in page
    assert 'data-action="undeploy"' in page and 'data-action="rollback"' in page

    job_page = browser.get(f"/ui/jobs/{job_id}").text
    assert '<span id="job-state" class="state state-RUNNING">RUNNING</span>' in job_page
    csrf = job_page.split('<meta name="csrf-token" content="', 1)[1].split('"', 1)[0]
    cancelled = browser.post(f"/ui/jobs/{job_id}/cancel", headers={"X-CSRF-Token": csrf})
    assert cancelled.status_code == 200, cancelled.text
    assert api.wait_for(job_id, DONE).state is JobState.CANCELLED
    assert "CANCELLED</span>" in browser.get(f"/ui/jobs/{job_id}", params={"fragment": 1}).text
