"""Placement on a 3-node Ray cluster whose simulated GPUs differ.

configs/cluster/two_nodes_sim.yaml: node-a has 2 A100 80 GB (NVLink); node-b has 4 T4
16 GB, of which GPU 2 has 12 GB held outside jobworker and GPU 3 is 95% busy. The
head node has no GPUs. Each job reports, from inside its own process, the Ray node it
runs on and its CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from typer.testing import CliRunner

from scheduler.cli.main import app as cli
from scheduler.core.states import JobState
from tests.conftest import wait_until
from tests.integration.conftest import Api, entrypoint_yaml

DONE = {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}


def seen_from_inside(api: Api, job_id: str) -> tuple[str, str]:
    def reported() -> tuple[str, str] | None:
        logs = api.http.get(f"/jobs/{job_id}/logs").json()["text"]
        node = re.search(r"ray_node_id=(\S+)", logs)
        gpus = re.search(r"cuda_visible_devices=(\S*)", logs)
        return (node.group(1), gpus.group(1)) if node and gpus else None

    return wait_until(reported, f"{job_id} reports its environment", 120, every_s=0.2)


def test_jobs_land_where_the_policy_predicts(make_api: Callable[..., Api]) -> None:
    api = make_api(cluster="two_nodes_sim.yaml")
    nodes = {n["hostname"]: n for n in api.http.get("/cluster").json()["nodes"]}
    assert [g["name"] for g in nodes["node-a"]["gpus"]] == ["A100", "A100"]
    assert [g["name"] for g in nodes["node-b"]["gpus"]] == ["T4"] * 4

    def job(name: str, hold_s: float, **resources: object) -> str:
        text = entrypoint_yaml(name, "report_and_hold", hold_s=hold_s, **resources)  # type: ignore[arg-type]
        response = api.http.post(
            "/jobs", content=text, headers={"content-type": "application/yaml"}
        )
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    # One pass places them in submit order (equal priority).
    t4_first = job("t4-first", 600, gpus=1, gpu_memory_gb=10, gpu_type="T4")
    gang = job("a100-gang", 3, gpus=2, gpu_memory_gb=40)
    t4_second = job("t4-second", 600, gpus=1, gpu_memory_gb=10, gpu_type="T4")
    waits = job("a100-big", 1, gpus=1, gpu_memory_gb=60)

    expected = {
        # pack: T4s 0 and 1 (16 GB free) tie; GPU 2 (4 GB free) is too small, GPU 3 too busy.
        t4_first: ("node-b", "0"),
        gang: ("node-a", "0,1"),
        t4_second: ("node-b", "1"),
    }
    for job_id, (hostname, gpus) in expected.items():
        node_id, visible = seen_from_inside(api, job_id)
        assert node_id == nodes[hostname]["node_id"], job_id
        assert visible == gpus, job_id
        assignment = api.plane.store.get(job_id).assignment
        assert assignment is not None and assignment.leader.hostname == hostname

    # The big job waits while the gang holds node-a, with a reason for every node.
    pending = api.http.get(f"/jobs/{waits}").json()
    if pending["state"] == "PENDING":
        reasons = pending["pending_reasons"]
        assert any(r.startswith("node-a") for r in reasons), reasons
        assert any(r.startswith("node-b") and "60.0 GiB" in r for r in reasons), reasons

    # ... and starts on node-a once the gang is done.
    assert api.wait_for(gang, DONE).state is JobState.SUCCEEDED
    node_id, visible = seen_from_inside(api, waits)
    assert node_id == nodes["node-a"]["node_id"]
    assert visible in {"0", "1"}
    history = [e["to_state"] for e in api.http.get(f"/jobs/{waits}").json()["history"]]
    assert history[:2] == ["PENDING", "SCHEDULED"]

    # Running jobs show in the cluster view on their GPUs.
    view = {n["hostname"]: n for n in api.http.get("/cluster").json()["nodes"]}
    assert view["node-b"]["gpus"][0]["jobs"] == [t4_first]
    assert view["node-b"]["gpus"][1]["jobs"] == [t4_second]
    for job_id in (t4_first, t4_second):
        api.http.post(f"/jobs/{job_id}/cancel")
    for job_id in (t4_first, t4_second, waits):
        assert api.wait_for(job_id, DONE).state in {JobState.CANCELLED, JobState.SUCCEEDED}


def test_job_too_big_for_any_node_is_refused_or_queued_anyway_with_reasons(
    make_api: Callable[..., Api], tmp_path: Path
) -> None:
    api = make_api(cluster="two_nodes_sim.yaml")
    text = entrypoint_yaml("huge", "report_and_hold", gpus=4, gpu_memory_gb=70)
    wait_until(lambda: len(api.plane.cluster.nodes()) == 3, "the 3 nodes report")
    refused = api.http.post("/jobs", content=text, headers={"content-type": "application/yaml"})
    assert refused.status_code == 422, refused.text
    detail = {(d["loc"], d["msg"]) for d in refused.json()["detail"]}
    # Each field that alone keeps it off: 1 GPU of 70 GB would fit node-a, 4 GPUs of
    # less memory node-b. Then each node's reason, by hostname.
    named = {loc for loc, msg in detail if "queue it anyway" in msg}
    assert named == {"resources.gpus", "resources.gpu_memory_gb"}, detail
    node_lines = [msg for loc, msg in detail if msg.startswith(("node-a:", "node-b:"))]
    assert any(m.startswith("node-a: needs 4 GPUs with ≥ 70.0 GiB free; has 2") for m in node_lines)
    assert any(m.startswith("node-b: needs 4 GPUs") for m in node_lines), detail
    assert api.http.get("/jobs").json() == []

    # The CLI says the same and, asked to, queues it for nodes yet to join.
    config = tmp_path / "huge.yaml"
    config.write_text(text)
    runner = CliRunner(env={"JOBWORKER_TOKEN": api.admin_token})
    cli_args = ["submit", str(config), "--api", str(api.http.base_url)]
    said = runner.invoke(cli, cli_args)
    assert said.exit_code != 0 and "node-a: needs 4 GPUs" in said.output, said.output
    queued = runner.invoke(cli, [*cli_args, "--queue-anyway"])
    assert queued.exit_code == 0, queued.output
    (job,) = api.http.get("/jobs").json()
    job_id = job["id"]
    wait_until(lambda: api.plane.store.get(job_id).pending_reasons, f"{job_id} has reasons")
    body = api.http.get(f"/jobs/{job_id}").json()
    assert body["state"] == "PENDING"
    reasons = body["pending_reasons"]
    assert len(reasons) >= 2
    assert any(r.startswith("node-a") and "4 GPUs" in r for r in reasons), reasons
    assert any(r.startswith("node-b") for r in reasons), reasons
    api.http.post(f"/jobs/{job_id}/cancel")
    assert api.wait_for(job_id, DONE).state is JobState.CANCELLED


def test_multi_node_gang_runs_one_rank_per_chosen_node(make_api: Callable[..., Api]) -> None:
    api = make_api(cluster="two_nodes_sim.yaml")
    text = (
        "name: gang\nexperiment: it\nentrypoint: tests.integration.user_code:gang_allreduce\n"
        "train: {max_steps: 1}\n"
        "resources: {gpus: 1, gpu_memory_gb: 10, cpus: 1, memory_gb: 1, nodes: 2}\n"
    )
    response = api.http.post("/jobs", content=text, headers={"content-type": "application/yaml"})
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    done = api.wait_for(job_id, DONE, 180)
    logs = api.http.get(f"/jobs/{job_id}/logs").json()["text"]
    assert done.state is JobState.SUCCEEDED, (done.error, logs[-3000:])

    placed = done.assignment.nodes if done.assignment else ()
    hostnames = {n.hostname for n in placed}
    assert hostnames == {"node-a", "node-b"}  # all-or-nothing on two distinct nodes
    for rank, node in enumerate(placed):
        prefix = "" if rank == 0 else f"[rank {rank}] "
        seen_node = re.search(rf"^{re.escape(prefix)}ray_node_id=(\S+)", logs, re.M)
        seen_gpus = re.search(rf"^{re.escape(prefix)}cuda_visible_devices=(\S*)", logs, re.M)
        assert seen_node and seen_node.group(1) == node.node_id, (rank, logs[-2000:])
        assert seen_gpus and seen_gpus.group(1) == ",".join(map(str, node.gpu_indices))
        assert re.search(rf"^{re.escape(prefix)}rank={rank} world=2 allreduce=3$", logs, re.M)
    run = api.mlflow().get_run(str(done.run_id))
    assert run.data.tags["jobworker.nodes"] == ",".join(n.hostname for n in placed)
    assert len(api.mlflow().get_metric_history(run.info.run_id, "allreduce")) == 1  # rank 0 only


def test_multi_node_builtin_training_is_data_parallel_in_one_run(
    make_api: Callable[..., Api],
) -> None:
    api = make_api(cluster="two_nodes_sim.yaml")
    text = (
        "name: ddp\nexperiment: it\n"
        "model: {name: mlp, options: {input_dim: 16, hidden: [16], num_classes: 4}}\n"
        "data: {options: {n_samples: 256, input_dim: 16, num_classes: 4}}\n"
        "train: {max_steps: 12, batch_size: 16, checkpoint_every_steps: 4}\n"
        "resources: {gpus: 1, gpu_memory_gb: 4, cpus: 1, memory_gb: 1, nodes: 2}\n"
        "register_as: ddp-mlp\n"
    )
    response = api.http.post("/jobs", content=text, headers={"content-type": "application/yaml"})
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    done = api.wait_for(job_id, DONE, 240)
    logs = api.http.get(f"/jobs/{job_id}/logs").json()["text"]
    assert done.state is JobState.SUCCEEDED, (done.error, logs[-3000:])
    assert "rank 1 of 2" in logs and "rank 0 of 2" in logs
    client = api.mlflow()
    steps = [int(m.step) for m in client.get_metric_history(str(done.run_id), "loss")]
    assert sorted(steps) == list(range(1, 13))  # one loss per synchronized step, rank 0's
    assert done.model_version == "1"
