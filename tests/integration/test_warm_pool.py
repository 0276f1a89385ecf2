"""Warm job processes on real Ray, MLflow (SQLite) and HTTP: a job placed while the pool
is warm runs in the process that idled in the pool before it was submitted, logs to one
MLflow run, and the pool refills with a new process; with no pool, or a dead warm process,
the job starts cold and runs."""

from __future__ import annotations

import os
import re
import signal
from typing import Any

import psutil
import ray
from typer.testing import CliRunner

from scheduler.cli.main import app as cli
from scheduler.core.states import JobState
from tests.conftest import wait_until
from tests.integration.conftest import Api, entrypoint_yaml
from workers.ray_pool import POOL_PREFIX

DONE = {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}


def _local(api: Api) -> dict[str, Any]:
    nodes = api.http.get("/cluster").json()["nodes"]
    return dict(next(n for n in nodes if n["hostname"] == "local"))


def _idle_on_local(api: Api) -> dict[str, Any] | None:
    pool = _local(api)["pool"]
    return pool if pool is not None and pool["idle"] == 1 else None


def _pool_pids(api: Api, node_id: str) -> list[int]:
    """The pids of the ready warm processes of the pool workers on ``node_id``."""
    names = [
        n["name"]
        for n in ray.util.list_named_actors(all_namespaces=True)
        if n["namespace"] == api.namespace and n["name"].startswith(POOL_PREFIX + node_id)
    ]
    pids = [ray.get(ray.get_actor(n, namespace=api.namespace).wait_warm.remote(0)) for n in names]
    return [pid for pid in pids if pid is not None]


def _idle_pid(api: Api) -> int:
    """The pid of the one ready warm process on local, once there is one."""
    wait_until(lambda: _idle_on_local(api), "a warm process idles on local", 180)
    pids = _pool_pids(api, _local(api)["node_id"])
    assert len(pids) == 1, pids
    return pids[0]


def _run(api: Api, name: str) -> int:
    """Run a job that reports its environment, check it and its one MLflow run; its pid."""
    job_id = _submit(api, entrypoint_yaml(name, "report_environment", cpus=2, gpus=1))
    job = api.wait_for(job_id, DONE)
    assert job.state is JobState.SUCCEEDED, job.error
    logs = api.http.get(f"/jobs/{job_id}/logs").json()["text"]
    assert job.assignment is not None
    gpu = job.assignment.leader.gpu_indices[0]
    # The job's own environment, applied in a warm process as in a cold one.
    assert "torch_threads=2" in logs and "omp_threads=2" in logs, logs
    assert f"cuda_visible_devices={gpu}" in logs and f"ctx_gpu_ids={gpu}" in logs, logs
    runs = api.mlflow().search_runs(
        [api.mlflow().get_experiment_by_name("it").experiment_id],
        filter_string=f"tags.`jobworker.job_id` = '{job_id}'",
    )
    assert [r.info.run_id for r in runs] == [job.run_id]
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["threads"] == 2.0  # logged while the run may still be opening
    found = re.search(r"^pid=(\d+)$", logs, re.MULTILINE)
    assert found, logs
    return int(found.group(1))


def _submit(api: Api, text: str) -> str:
    r = api.http.post("/jobs", content=text, headers={"content-type": "application/yaml"})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def test_a_job_placed_while_the_pool_is_warm_runs_in_a_warm_process_and_it_refills(
    make_api: Any,
) -> None:
    api: Api = make_api(warm_pool=1)
    warm_pid = _idle_pid(api)
    pool = _local(api)["pool"]
    assert pool["size"] == 1 and pool["idle_rss_bytes"] > 0
    runner = CliRunner(env={"JOBWORKER_TOKEN": api.admin_token, "COLUMNS": "250"})
    listed = runner.invoke(cli, ["cluster", "--api", str(api.http.base_url)])
    assert listed.exit_code == 0, listed.output
    assert "1/1 idle" in next(line for line in listed.output.splitlines() if "local" in line)

    assert _run(api, "warm") == warm_pid  # the process that idled before the submit

    refilled_pid = _idle_pid(api)  # a new process: a used one is never reused
    assert refilled_pid != warm_pid and not psutil.pid_exists(warm_pid)
    assert _run(api, "warm-again") == refilled_pid


def test_without_a_pool_a_job_starts_cold(make_api: Any) -> None:
    api: Api = make_api(warm_pool=0)
    assert _local(api)["pool"] == {"size": 0, "idle": 0, "idle_rss_bytes": 0}
    _run(api, "cold")
    assert _pool_pids(api, _local(api)["node_id"]) == []  # no pool worker was ever made


def test_a_job_handed_to_a_dead_warm_process_starts_cold(make_api: Any) -> None:
    api: Api = make_api(warm_pool=1)
    dead_pid = _idle_pid(api)
    os.kill(dead_pid, signal.SIGKILL)
    wait_until(
        lambda: not psutil.pid_exists(dead_pid) or psutil.Process(dead_pid).status() == "zombie",
        "the warm process dies",
    )
    assert _run(api, "cold-fallback") != dead_pid


def test_a_gang_runs_each_rank_in_its_nodes_warm_process(make_api: Any) -> None:
    api: Api = make_api(cluster="two_nodes_sim.yaml", warm_pool=1)
    nodes = {"node-a": "", "node-b": ""}

    def idle_on_both() -> bool:
        listed = api.http.get("/cluster").json()["nodes"]
        found = {n["hostname"]: n for n in listed if n["hostname"] in nodes}
        nodes.update({host: n["node_id"] for host, n in found.items()})
        return len(found) == 2 and all((n["pool"] or {}).get("idle") == 1 for n in found.values())

    wait_until(idle_on_both, "a warm process idles on node-a and on node-b", 180)
    warm_pids = {host: _pool_pids(api, node_id) for host, node_id in nodes.items()}
    text = (
        "name: gang\nexperiment: it\nentrypoint: tests.integration.user_code:gang_allreduce\n"
        "train: {max_steps: 1}\n"
        "resources: {gpus: 1, gpu_memory_gb: 10, cpus: 1, memory_gb: 1, nodes: 2}\n"
    )
    job_id = _submit(api, text)
    done = api.wait_for(job_id, DONE, 180)
    logs = api.http.get(f"/jobs/{job_id}/logs").json()["text"]
    assert done.state is JobState.SUCCEEDED, (done.error, logs[-3000:])
    placed = done.assignment.nodes if done.assignment else ()
    for rank, node in enumerate(placed):
        prefix = "" if rank == 0 else f"[rank {rank}] "
        assert re.search(rf"^{re.escape(prefix)}rank={rank} world=2 allreduce=3$", logs, re.M)
        pid = re.search(rf"^{re.escape(prefix)}pid=(\d+)$", logs, re.M)
        assert pid and [int(pid.group(1))] == warm_pids[node.hostname], (rank, logs[-2000:])
