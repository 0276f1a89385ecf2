"""Enforced GPU memory on real Ray over simulated GPUs: a job that holds more than it asked
for is stopped by its node agent, with the reason, not retried, and the replica on its node
serves on."""

from __future__ import annotations

from typing import Any

import torch

from scheduler.core.states import JobState
from tests.integration.conftest import Api, entrypoint_yaml
from tests.integration.serving_helpers import deploy, deploy_yaml, log_model, rows, wait_deployment
from workers.interface.telemetry import GIB
from workers.sim_backend import write_usage


def test_a_job_over_its_gpu_memory_cap_is_stopped_and_the_replica_on_its_node_serves_on(
    make_api: Any,
) -> None:
    api: Api = make_api()  # node "local": two simulated 40 GB A100s
    log_model(api.tracking_uri, "capped", torch.nn.Sequential(torch.nn.Linear(64, 10)))
    deploy(api, deploy_yaml("capped", "models:/capped/1", resources="{gpu_memory_gb: 8, cpus: 1}"))
    (replica,) = wait_deployment(api, "capped")["replicas"]

    text = entrypoint_yaml("greedy", "exceed_gpu_memory", gpus=1, gpu_memory_gb=8, hold_gib=23.1)
    r = api.http.post(
        "/jobs", content=text + "max_retries: 2\n", headers={"content-type": "application/yaml"}
    )
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    done = api.wait_for(job_id, {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}, 180)

    assert done.assignment is not None
    (gpu,) = done.assignment.leader.gpu_indices
    # Beside the replica on the node (a training job gets a GPU to itself: shared GPUs
    # are for replicas, and for tenants outside jobworker, as GPU 1's 8 GB here).
    assert done.assignment.leader.hostname == replica["node"] == "local"
    reason = f"used 23.1 GiB on GPU {gpu}, asked for 8 GiB; raise resources.gpu_memory_gb"
    assert (done.state, done.error) == (JobState.FAILED, reason)
    assert (done.attempts, done.failures) == (1, 1)  # not retried: it would go over again
    history = api.plane.store.history(job_id)
    assert [e.to_state for e in history if e.from_state][-1] is JobState.FAILED
    assert not any(e.to_state is JobState.PENDING for e in history if e.from_state)
    shown = api.http.get(f"/jobs/{job_id}").json()
    assert shown["state"] == "FAILED" and shown["error"] == reason

    answer = api.http.post("/v1/models/capped/predict", json={"inputs": rows(2)})
    assert answer.status_code == 200, answer.text
    after = api.http.get("/deployments/capped").json()
    assert after["state"] == "READY" and [r["id"] for r in after["replicas"]] == [replica["id"]]


def test_a_replica_over_its_gpu_memory_cap_is_replaced_and_the_deployment_says_why(
    make_api: Any,
) -> None:
    api: Api = make_api()
    log_model(api.tracking_uri, "greedy", torch.nn.Sequential(torch.nn.Linear(64, 10)))
    deploy(api, deploy_yaml("greedy", "models:/greedy/1", resources="{gpu_memory_gb: 8, cpus: 1}"))
    (replica,) = wait_deployment(api, "greedy")["replicas"]
    # The replica's process "allocates" 30 GiB: its simulated per-process reading says so.
    (usage,) = (api.home / "simgpu").glob(f"{replica['id']}@*.json")
    pid = int(usage.stem.rsplit("@", 1)[1])
    write_usage(usage.parent, replica["id"], pid, replica["gpu_indices"], 30 * GIB)

    reason = (
        f"used 30.0 GiB on GPU {replica['gpu_indices'][0]}, asked for 8 GiB; "
        "raise resources.gpu_memory_gb"
    )
    message = f"replica {replica['id']} was replaced: {reason}"
    # The state and message are the stored record, the replicas the controller's live view:
    # a new replica can be listed before the record says why; wait for both.
    wait_deployment(
        api,
        "greedy",
        lambda d: (
            d["state"] == "READY"
            and [r["id"] for r in d["replicas"]] != [replica["id"]]
            and d["message"] == message
        ),
    )
    answer = api.http.post("/v1/models/greedy/predict", json={"inputs": rows(2)})
    assert answer.status_code == 200, answer.text
