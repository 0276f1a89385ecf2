"""The real-time lane end to end: real Ray replicas, MLflow registry, HTTP, load."""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import ray
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from scheduler.cli.main import app as cli
from scheduler.core.states import JobState
from tests.conftest import wait_until
from tests.integration.conftest import TRAIN_YAML, Api
from tests.integration.serving_helpers import (
    Traffic,
    deploy,
    deploy_yaml,
    log_model,
    open_loop,
    rows,
    wait_deployment,
)
from tests.integration.user_code import SlowModel
from workers.interface.telemetry import GIB
from workers.ray_replicas import ACTOR_PREFIX


def _outputs_of(tracking_uri: str, uri: str, inputs: list[list[float]]) -> np.ndarray:
    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pytorch.load_model(uri, map_location="cpu")
    with torch.no_grad():
        return np.asarray(model(torch.tensor(inputs, dtype=torch.float32)).numpy())


def test_train_deploy_predict_then_alias_move_rolls_without_failures(make_api: Any) -> None:
    api: Api = make_api()
    train = TRAIN_YAML.format(
        name="rt-train",
        experiment="rt",
        steps=20,
        gpus=1,
        gpu_memory_gb=1,
        register_as="rt-mlp",
    ).replace("options: {hidden: [32]}", "options: {input_dim: 64, hidden: [32]}")
    train = (
        train.replace("options: {n_samples: 256}", "options: {n_samples: 256, input_dim: 64}")
        + "register_alias: champion\n"
    )
    job = api.http.post("/jobs", content=train, headers={"content-type": "application/yaml"})
    assert job.status_code == 201, job.text
    done = api.wait_for(job.json()["id"], {JobState.SUCCEEDED, JobState.FAILED}, 180)
    assert done.state is JobState.SUCCEEDED, done.error
    assert done.model_version == "1"

    deploy(api, deploy_yaml("rt-mlp", "models:/rt-mlp@champion", slo="{p99_ms: 2000}"))
    dep = wait_deployment(api, "rt-mlp")
    assert dep["model_version"] == "1" and dep["run_id"] == done.run_id

    inputs = rows(5)
    r = api.http.post("/v1/models/rt-mlp/predict", json={"inputs": inputs})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = _outputs_of(api.tracking_uri, "models:/rt-mlp/1", inputs)
    np.testing.assert_allclose(np.array(body["outputs"]), expected, rtol=1e-5, atol=1e-6)
    assert (body["model"], body["version"], body["run_id"]) == ("rt-mlp", "1", done.run_id)
    assert r.headers["x-model-version"] == "1"
    assert r.headers["x-mlflow-run-id"] == done.run_id

    # A new version, then the alias moves while requests keep flowing.
    torch.manual_seed(7)
    v2 = log_model(api.tracking_uri, "rt-mlp", torch.nn.Sequential(torch.nn.Linear(64, 10)))
    traffic = Traffic(api, "rt-mlp").start()
    wait_until(lambda: traffic.count("1") >= 20, "20 answers from version 1")
    MlflowClient(api.tracking_uri).set_registered_model_alias("rt-mlp", "champion", v2)
    wait_deployment(api, "rt-mlp", lambda d: d["model_version"] == v2 and d["state"] == "READY")
    wait_until(lambda: traffic.count(v2) >= 20, f"20 answers from version {v2}")
    results = traffic.stop()

    assert [(s, b) for s, _, b in results if s != 200] == [], "a request failed in the switch"
    versions = [v for _, v, _ in results]
    switch = versions.index(v2)
    assert switch > 0 and set(versions[:switch]) == {"1"} and set(versions[switch:]) == {v2}
    r = api.http.post("/v1/models/rt-mlp/predict", json={"inputs": inputs})
    expected_v2 = _outputs_of(api.tracking_uri, f"models:/rt-mlp/{v2}", inputs)
    np.testing.assert_allclose(np.array(r.json()["outputs"]), expected_v2, rtol=1e-5, atol=1e-6)
    dep = wait_deployment(api, "rt-mlp", lambda d: len(d["replicas"]) == 1)
    assert [rep["model_version"] for rep in dep["replicas"]] == [v2]


def test_refusals_name_what_is_wrong(make_api: Any) -> None:
    api: Api = make_api()
    log_model(api.tracking_uri, "refuse-mlp", torch.nn.Sequential(torch.nn.Linear(64, 10)))

    bad = api.http.post(
        "/deployments",
        content="name: Bad Name\nmodel: models:/x\nbatching: {max_batch_size: 0}\n",
        headers={"content-type": "application/yaml"},
    )
    assert bad.status_code == 422
    locs = {d["loc"] for d in bad.json()["detail"]}
    assert {"name", "model", "batching.max_batch_size"} <= locs
    missing = api.http.post(
        "/deployments",
        content=deploy_yaml("ghost", "models:/no-such-model@champion"),
        headers={"content-type": "application/yaml"},
    )
    assert missing.status_code == 422
    assert missing.json()["detail"][0]["loc"] == "model"
    assert "no-such-model" in missing.json()["detail"][0]["msg"]
    assert api.http.get("/deployments").json() == []  # nothing half-written
    assert api.http.get("/deployments/ghost").status_code == 404
    assert api.http.post("/v1/models/ghost/predict", json={"inputs": rows(1)}).status_code == 404

    deploy(api, deploy_yaml("refuse-mlp", "models:/refuse-mlp/1"))
    wait_deployment(api, "refuse-mlp")
    url = "/v1/models/refuse-mlp/predict"
    wrong = api.http.post(url, json={"inputs": [[0.0] * 63]})
    assert wrong.status_code == 422
    assert "expected shape (N, 64) float32, got (1, 63)" in wrong.json()["detail"]
    assert (
        api.http.post(
            url, content=b"{not json", headers={"content-type": "application/json"}
        ).status_code
        == 422
    )
    assert api.http.post(url, json={"rows": rows(1)}).status_code == 422
    assert api.http.post(url, json={"inputs": [["a"] * 64]}).status_code == 422
    assert api.http.post(url, json={"inputs": rows(3)}).status_code == 200


def test_cli_deploy_predict_undeploy(make_api: Any, tmp_path: Any) -> None:
    api: Api = make_api()
    log_model(api.tracking_uri, "cli-mlp", torch.nn.Sequential(torch.nn.Linear(64, 10)))
    config = tmp_path / "cli.yaml"
    config.write_text(deploy_yaml("cli-mlp", "models:/cli-mlp/1", resources="{gpu_memory_gb: 2}"))
    url = str(api.http.base_url)
    runner = CliRunner(env={"JOBWORKER_TOKEN": api.admin_token})

    def used_bytes() -> dict[tuple[str, int], int]:
        nodes = api.http.get("/cluster").json()["nodes"]
        return {
            (n["hostname"], g["index"]): g["memory_used_bytes"] for n in nodes for g in n["gpus"]
        }

    def eventually(check: Any) -> None:
        wait_until(lambda: check(used_bytes()), "the GPU's memory in /cluster", 30, every_s=0.3)

    baseline = used_bytes()
    result = runner.invoke(cli, ["deploy", str(config), "--api", url])
    assert result.exit_code == 0, result.output
    assert "READY" in result.output
    dep = api.http.get("/deployments/cli-mlp").json()
    (replica,) = dep["replicas"]
    assert len(replica["gpu_indices"]) == 1, "a replica asking for GPU memory gets one GPU"
    gpu = (replica["node"], replica["gpu_indices"][0])
    # The replica's memory shows in the (simulated) telemetry of its GPU, then goes.
    eventually(lambda used: used[gpu] >= baseline[gpu] + 2 * GIB)

    listed = runner.invoke(cli, ["deployments", "--api", url])
    assert listed.exit_code == 0 and "cli-mlp" in listed.output
    inputs = tmp_path / "rows.json"
    inputs.write_text(f'{{"inputs": {rows(2)}}}')
    predicted = runner.invoke(cli, ["predict", "cli-mlp", "--input", str(inputs), "--api", url])
    assert predicted.exit_code == 0, predicted.output
    assert "version 1" in predicted.output
    wrong = runner.invoke(cli, ["predict", "cli-mlp", "--data", "[[1, 2]]", "--api", url])
    assert wrong.exit_code == 2 and "expected shape (N, 64)" in wrong.output

    gone = runner.invoke(cli, ["undeploy", "cli-mlp", "--api", url])
    assert gone.exit_code == 0
    assert api.http.get("/deployments/cli-mlp").status_code == 404
    eventually(lambda used: used[gpu] == baseline[gpu])
    missing = runner.invoke(cli, ["undeploy", "cli-mlp", "--api", url])
    assert missing.exit_code == 2 and "no deployment named 'cli-mlp'" in missing.output


def test_overload_sheds_with_429_and_retry_after(make_api: Any) -> None:
    """Three times its capacity: answered 200 or 429 (each with Retry-After), nothing else.

    How fast the admitted requests are (against the SLO) and what the API's memory does
    under it is measured by ``bench/overload.py``, not asserted here."""
    api: Api = make_api()
    log_model(api.tracking_uri, "slow", SlowModel(delay_s=0.02), pickle=True)
    slo_ms = 500
    deploy(
        api,
        deploy_yaml(
            "slow",
            "models:/slow/1",
            replicas="{min: 1, max: 1}",
            batching="{max_batch_size: 4}",
            slo=f"{{p99_ms: {slo_ms}}}",
            max_queue="256",
            allow_pickled_model="true",  # SlowModel is pickled: its sleep is Python code
        ),
    )
    wait_deployment(api, "slow")
    # The replica answers ~4 rows per 20 ms (about 200/s). Offer 600/s.
    url = f"{api.http.base_url}/v1/models/slow/predict"
    report = open_loop(url, rate=600, duration_s=8, token=api.admin_token)

    statuses = report["statuses"]
    assert report["error_count"] == 0, report["errors"]  # no hang, no reset
    assert set(statuses) <= {"200", "429"}, statuses
    assert statuses.get("429", 0) > 0 and statuses.get("200", 0) > 0
    assert report["missing_retry_after"] == 0
    metrics = api.http.get("/metrics").text
    assert 'jobworker_requests_shed_total{model="slow",reason="slo"}' in metrics
    assert 'jobworker_request_latency_seconds_count{model="slow"}' in metrics


def test_autoscaler_adds_a_replica_under_load_and_removes_it_after(make_api: Any) -> None:
    api: Api = make_api()
    log_model(api.tracking_uri, "busy", SlowModel(delay_s=0.02), pickle=True)
    deploy(
        api,
        deploy_yaml(
            "busy",
            "models:/busy/1",
            replicas="{min: 1, max: 2}",
            batching="{max_batch_size: 2}",
            slo="{p99_ms: 5000}",
            max_queue="1024",
            autoscaling="{target_queue_per_replica: 2, upscale_delay_s: 1, downscale_delay_s: 3}",
            allow_pickled_model="true",  # SlowModel is pickled: its sleep is Python code
        ),
    )
    wait_deployment(api, "busy")

    def serving(d: dict[str, Any]) -> int:
        return sum(r["routed"] for r in d["replicas"])

    loads = [Traffic(api, "busy").start() for _ in range(8)]  # 8 in flight: 4 per batch slot
    try:
        wait_deployment(api, "busy", lambda d: serving(d) == 2, timeout_s=120)
    finally:
        results = [r for t in loads for r in t.stop()]
    assert results and all(status == 200 for status, _, _ in results)
    wait_deployment(api, "busy", lambda d: serving(d) == 1 and len(d["replicas"]) == 1, 120)
    metrics = api.http.get("/metrics").text
    assert 'jobworker_replicas{model="busy"} 1.0' in metrics


def test_killed_replica_is_replaced_and_only_documented_503s_are_seen(make_api: Any) -> None:
    api: Api = make_api()
    log_model(api.tracking_uri, "kill-mlp", torch.nn.Sequential(torch.nn.Linear(64, 10)))
    deploy(
        api,
        deploy_yaml(
            "kill-mlp", "models:/kill-mlp/1", replicas="{min: 2, max: 2}", slo="{p99_ms: 5000}"
        ),
    )
    dep = wait_deployment(api, "kill-mlp", lambda d: sum(r["routed"] for r in d["replicas"]) == 2)
    before = {r["id"] for r in dep["replicas"]}
    victim = sorted(before)[0]
    traffic = Traffic(api, "kill-mlp").start()
    wait_until(lambda: len(traffic.results) >= 20, "20 answers before the kill")
    ray.kill(ray.get_actor(f"{ACTOR_PREFIX}{victim}", namespace=api.namespace))
    dep = wait_deployment(
        api,
        "kill-mlp",
        lambda d: (
            victim not in {r["id"] for r in d["replicas"]}
            and sum(r["routed"] for r in d["replicas"]) == 2
        ),
        timeout_s=120,
    )
    n_at_recovery = len(traffic.results)
    wait_until(lambda: len(traffic.results) >= n_at_recovery + 20, "20 answers after recovery")
    results = traffic.stop()

    after = {r["id"] for r in dep["replicas"]}
    assert victim not in after and len(after - before) == 1
    for status, _, body in results:
        assert status == 200 or (status == 503 and "died while serving" in body), (status, body)
    assert all(s == 200 for s, _, _ in results[n_at_recovery:])
    assert len(results) > n_at_recovery


def test_rollback_returns_to_the_version_served_before(make_api: Any) -> None:
    api: Api = make_api()
    for seed in (1, 2):
        torch.manual_seed(seed)
        log_model(api.tracking_uri, "rb-mlp", torch.nn.Sequential(torch.nn.Linear(64, 10)))
    deploy(api, deploy_yaml("rb-mlp", "models:/rb-mlp/1"))
    wait_deployment(api, "rb-mlp", lambda d: d["model_version"] == "1" and d["state"] == "READY")
    refused = api.http.post("/deployments/rb-mlp/rollback")
    assert refused.status_code == 409, refused.text
    assert "has served version 1 of 'rb-mlp' and none before it" in refused.json()["detail"]

    deploy(api, deploy_yaml("rb-mlp", "models:/rb-mlp/2"))
    wait_deployment(api, "rb-mlp", lambda d: d["model_version"] == "2" and d["state"] == "READY")
    runner = CliRunner(env={"JOBWORKER_TOKEN": api.admin_token})
    url = str(api.http.base_url)
    result = runner.invoke(cli, ["rollback", "rb-mlp", "--api", url])
    assert result.exit_code == 0, result.output
    assert "rolling rb-mlp back to models:/rb-mlp/1" in result.output
    dep = api.http.get("/deployments/rb-mlp").json()
    assert (dep["model"], dep["model_version"], dep["state"]) == ("models:/rb-mlp/1", "1", "READY")
    r = api.http.post("/v1/models/rb-mlp/predict", json={"inputs": rows(2)})
    assert r.status_code == 200 and r.json()["version"] == "1", r.text
    audit = api.http.get("/audit", params={"limit": 5}).json()
    assert any(e["path"] == "/deployments/rb-mlp/rollback" for e in audit), audit

    # Rolling back again returns to the version rolled back from.
    again = api.http.post("/deployments/rb-mlp/rollback")
    assert again.status_code == 200 and again.json()["model"] == "models:/rb-mlp/2", again.text
    wait_deployment(api, "rb-mlp", lambda d: d["model_version"] == "2" and d["state"] == "READY")
    missing = api.http.post("/deployments/nope/rollback")
    assert missing.status_code == 404, missing.text
