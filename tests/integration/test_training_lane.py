"""The training lane end to end on real Ray, MLflow (SQLite), SQLite and HTTP; a job's whole
life and a restart on PostgreSQL too."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow.pytorch
import pytest
import torch

from scheduler.core.states import JobState
from tests.conftest import REPO, wait_until
from tests.integration.conftest import TRAIN_YAML, Api, entrypoint_yaml

DONE = {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}


def train_yaml(name: str = "mlp-it", steps: int = 30, gpus: int = 1, **kw: object) -> str:
    fields = {
        "name": name,
        "experiment": "it",
        "steps": steps,
        "gpus": gpus,
        "gpu_memory_gb": 2 if gpus else 0,
        "register_as": name,
        **kw,
    }
    return TRAIN_YAML.format(**fields)


def local_gpus(api: Api) -> list[dict[str, Any]]:
    nodes = api.http.get("/cluster").json()["nodes"]
    return list(next(n for n in nodes if n["hostname"] == "local")["gpus"])


def submit(api: Api, text: str) -> str:
    response = api.http.post("/jobs", content=text, headers={"content-type": "application/yaml"})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def test_submit_runs_to_success_with_metrics_artifacts_and_registered_model(
    store_url: str, make_api: Callable[..., Api]
) -> None:
    api = make_api(db_url=store_url)
    text = train_yaml(steps=30)
    job_id = submit(api, text)
    job = api.wait_for(job_id, DONE)
    assert job.state is JobState.SUCCEEDED, job.error

    body = api.http.get(f"/jobs/{job_id}").json()
    assert [e["to_state"] for e in body["history"]] == [
        "PENDING",
        "SCHEDULED",
        "RUNNING",
        "SUCCEEDED",
    ]
    assert body["progress"]["step"] == 30
    # `pack` takes the tightest fit: GPU 1 (32 GB free: 8 GB held outside) before GPU 0 (40).
    assert [n["gpu_indices"] for n in body["assignment"]["nodes"]] == [[1]]

    client = api.mlflow()
    run = client.get_run(body["run_id"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(
        range(1, 31)
    )
    assert run.data.params["train.max_steps"] == "30"
    assert run.data.params["model.name"] == "mlp"
    tags = run.data.tags
    assert tags["jobworker.job_id"] == job_id
    assert tags["jobworker.node"] == "local"
    assert tags["jobworker.gpu_ids"] == "1"
    assert tags["jobworker.gpu_uuids"] == body["assignment"]["nodes"][0]["gpu_uuids"][0]
    assert float(tags["jobworker.queue_wait_s"]) >= 0
    config = client.download_artifacts(run.info.run_id, "config.yaml", str(api.home))
    assert Path(config).read_text() == text
    checkpoints = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")]
    assert checkpoints == [f"checkpoints/step-{s:09d}.pt" for s in (10, 20, 30)]

    # The run's description links back to the job's page in the console.
    assert tags["mlflow.note.content"] == (
        f"jobworker job [{job_id}](http://127.0.0.1:8000/ui/jobs/{job_id})"
    )
    logs = api.http.get(f"/jobs/{job_id}/logs").json()["text"]
    progress = [line for line in logs.splitlines() if line.startswith("step ")]
    assert progress[0].startswith("step 1/30  loss ")
    assert progress[-1].startswith("step 30/30  loss ")
    assert all(line.endswith(" samples/s") for line in progress)

    version = client.get_model_version("mlp-it", body["model_version"])
    assert version.run_id == run.info.run_id
    assert version.tags == {
        "jobworker.job_id": job_id,
        "jobworker.team": job.team,
        "jobworker.run_id": run.info.run_id,
    }
    mlflow.set_tracking_uri(api.tracking_uri)
    model = mlflow.pytorch.load_model(f"models:/mlp-it/{body['model_version']}")
    assert model(torch.zeros(3, 64)).shape == (3, 10)
    info = mlflow.models.get_model_info(f"models:/mlp-it/{body['model_version']}")
    assert info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 64)


def test_the_run_records_system_metrics(api: Api) -> None:
    """MLflow's system-metrics monitor samples every 2 s: the job runs until its run shows one."""
    job_id = submit(api, entrypoint_yaml("sysmetrics", "hold_until_system_metrics"))
    job = api.wait_for(job_id, DONE)
    assert job.state is JobState.SUCCEEDED, job.error
    assert job.run_id is not None
    metrics = api.mlflow().get_run(job.run_id).data.metrics
    assert any(k.startswith("system/") for k in metrics), sorted(metrics)


@pytest.mark.parametrize(
    "config", sorted(p.name for p in (REPO / "configs" / "train").glob("*.yaml"))
)
def test_example_configs_run(api: Api, config: str) -> None:
    job_id = submit(api, (REPO / "configs" / "train" / config).read_text())
    job = api.wait_for(job_id, DONE, timeout_s=240)
    assert job.state is JobState.SUCCEEDED, job.error
    assert job.model_version is not None


def test_user_code_exception_fails_with_traceback_in_logs(api: Api) -> None:
    job_id = submit(api, entrypoint_yaml("boom", "explode", why="testing"))
    job = api.wait_for(job_id, DONE)
    assert job.state is JobState.FAILED
    assert job.error == "RuntimeError: boom from user code (testing)"
    logs = api.http.get(f"/jobs/{job_id}/logs").json()["text"]
    assert "Traceback (most recent call last)" in logs
    assert "boom from user code" in logs
    history = api.http.get(f"/jobs/{job_id}").json()["history"]
    assert history[-1]["reason"] == job.error


def test_job_uses_exactly_its_cpu_threads_and_gpus(api: Api) -> None:
    job_id = submit(api, entrypoint_yaml("env", "report_environment", cpus=2, gpus=1))
    job = api.wait_for(job_id, DONE)
    assert job.state is JobState.SUCCEEDED, job.error
    logs = api.http.get(f"/jobs/{job_id}/logs").json()["text"]
    assert "torch_threads=2" in logs
    assert "omp_threads=2" in logs
    assert job.assignment is not None
    gpu = job.assignment.leader.gpu_indices[0]
    assert f"cuda_visible_devices={gpu}" in logs
    assert f"ctx_gpu_ids={gpu}" in logs


@pytest.mark.parametrize("fn", ["run_until_stopped", "ignore_stop"])
def test_cancel_running_job_stops_it_and_frees_its_gpu(api: Api, fn: str) -> None:
    job_id = submit(api, entrypoint_yaml(f"cancel-{fn}".replace("_", "-"), fn, gpus=1))
    api.wait_for(job_id, {JobState.RUNNING})
    # Wait until the job process itself reports progress (and its pid is known), then cancel.
    job = wait_until(
        lambda: (j := api.plane.store.get(job_id)).progress and j.progress.step and j,
        f"{job_id} reports a step",
    )
    assert job.assignment is not None
    pid, gpu = job.assignment.leader.pid, job.assignment.leader.gpu_indices[0]
    assert pid is not None
    assert local_gpus(api)[gpu]["jobs"] == [job_id]

    assert api.http.post(f"/jobs/{job_id}/cancel").status_code == 200
    job = api.wait_for(job_id, DONE)
    assert job.state is JobState.CANCELLED
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert job_id not in api.plane.executor.active()
    local = next(n for n in api.plane.cluster.nodes(fresh=True) if n.hostname == "local")
    assert all(p.pid != pid for g in local.gpus for p in g.processes)
    assert local_gpus(api)[gpu]["jobs"] == []


def test_cancel_pending_job_never_runs(api: Api) -> None:
    too_big = train_yaml(name="too-big", gpus=1).replace("gpu_memory_gb: 2", "gpu_memory_gb: 500")
    response = api.http.post(
        "/jobs",
        content=too_big,
        params={"queue_anyway": "true"},  # no node could hold it: queued for one to join
        headers={"content-type": "application/yaml"},
    )
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    wait_until(lambda: api.plane.store.get(job_id).pending_reasons, f"{job_id} has reasons")
    reasons = api.http.get(f"/jobs/{job_id}").json()["pending_reasons"]
    assert any("500.0 GiB" in r for r in reasons), reasons
    api.http.post(f"/jobs/{job_id}/cancel")
    job = api.wait_for(job_id, DONE)
    assert job.state is JobState.CANCELLED
    assert job.attempts == 0


BAD_CONFIGS = [
    ("resources: {gpus: -1}", "resources.gpus", "greater than or equal to 0"),
    ("colour: blue", "colour", "unknown key 'colour'"),
    ("train: {max_steps: 5, batch_size: 0}", "train.batch_size", "greater than or equal to 1"),
    ("entrypoint: no_such_module.sub:fn", "entrypoint", "cannot find module"),
    ("model: {name: resnet9000}", "model", "resnet9000"),
]


@pytest.mark.parametrize(("patch", "loc", "words"), BAD_CONFIGS)
def test_bad_config_is_refused_with_field_and_nothing_stored(
    api: Api, patch: str, loc: str, words: str
) -> None:
    base = {"name": "bad", "model": "{name: mlp}", "train": "{max_steps: 5}"}
    key = patch.split(":", 1)[0]
    if key == "entrypoint":
        base.pop("model")
    lines = [f"{k}: {v}" for k, v in base.items() if k != key] + [patch]
    before = api.http.get("/jobs").json()
    response = api.http.post(
        "/jobs", content="\n".join(lines), headers={"content-type": "application/yaml"}
    )
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert any(d["loc"] == loc and words in d["msg"] for d in detail), detail
    assert api.http.get("/jobs").json() == before


def test_yaml_syntax_error_names_the_line(api: Api) -> None:
    response = api.http.post(
        "/jobs",
        content="name: x\ntrain: {max_steps: 3\nmodel: mlp\n",
        headers={"content-type": "application/yaml"},
    )
    assert response.status_code == 422
    assert "line 3" in response.json()["detail"][0]["msg"]
    assert api.http.get("/jobs").json() == []


def test_json_body_is_accepted(api: Api) -> None:
    body = {"name": "json-job", "model": {"name": "mlp"}, "train": {"max_steps": 2}}
    response = api.http.post("/jobs/validate", json=body)
    assert response.status_code == 200
    assert response.json()["spec"]["train"]["max_steps"] == 2


def test_restarted_api_keeps_jobs_and_histories(
    store_url: str, make_api: Callable[..., Api], tmp_path: Path
) -> None:
    first = make_api(db_url=store_url)
    job_id = submit(first, entrypoint_yaml("boom", "explode"))
    first.wait_for(job_id, DONE)
    before = first.http.get(f"/jobs/{job_id}").json()
    first.plane.stop()

    second = make_api(home=tmp_path, db_url=store_url)
    after = second.http.get(f"/jobs/{job_id}").json()
    assert after == before
    assert [j["id"] for j in second.http.get("/jobs").json()] == [job_id]


def test_unknown_job_is_404(api: Api) -> None:
    response = api.http.get("/jobs/j-nope")
    assert response.status_code == 404
    assert "j-nope" in response.json()["detail"]


def test_jobs_of_a_new_experiment_starting_together_all_succeed(api: Api) -> None:
    """They race to create the experiment; the losers read back the winner's."""
    texts = [
        entrypoint_yaml(f"race{i}", "report_environment").replace(
            "experiment: it", "experiment: brand-new"
        )
        for i in range(4)
    ]
    ids = [submit(api, text) for text in texts]
    jobs = [api.wait_for(job_id, DONE) for job_id in ids]
    assert all(j.state is JobState.SUCCEEDED for j in jobs), [(j.state, j.error) for j in jobs]
    experiment = api.mlflow().get_experiment_by_name("brand-new")
    assert experiment is not None
    runs = api.mlflow().search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["jobworker.job_id"] for r in runs) == sorted(ids)


def test_creating_an_experiment_is_idempotent(tmp_path: Path) -> None:
    """The race, made certain: another job creates the experiment between our look and our
    create, and we get its id instead of an error."""
    from mlflow.tracking import MlflowClient

    from workers.job_runner import _experiment_id

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    class Beaten(MlflowClient):
        """Sees no experiment on its first look; a rival creates it right after."""

        looks = 0

        def get_experiment_by_name(self, name: str) -> Any:
            self.looks += 1
            if self.looks == 1:
                MlflowClient(uri).create_experiment(name)
                return None
            return super().get_experiment_by_name(name)

    client = Beaten(uri)
    experiment_id = _experiment_id(client, "contested")
    assert experiment_id == MlflowClient(uri).get_experiment_by_name("contested").experiment_id
    assert _experiment_id(MlflowClient(uri), "contested") == experiment_id
