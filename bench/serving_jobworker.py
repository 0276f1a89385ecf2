"""jobworker's side of ``bench/serving.py``: the model in MLflow, the server, the deployment.

- ``register_model(workdir)`` logs the bench MLP with ``mlflow.pytorch.log_model`` into a
  fresh tracking store (``sqlite:///<workdir>/mlflow.db``, artifacts under
  ``<workdir>/artifacts``) and registers it as ``bench-mlp`` → ``models:/bench-mlp/1``.
- ``start_jobworker(...)`` runs ``jobworker up`` (its own local Ray inside) on a free
  port, waits for ``GET /healthz``, ``POST /deployments`` the YAML below and waits until
  ``GET /deployments/bench-mlp`` says ``"state": "READY"``; the predict URL is
  ``/v1/models/bench-mlp/predict``.

Run on its own to check the MLflow part::

    .venv/bin/python bench/serving_jobworker.py /tmp/somewhere
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.serving_model import build_model, example_rows, predict  # noqa: E402
from bench.serving_procs import ServerProcess, free_port, http_ok, launch  # noqa: E402

MODEL_NAME = "bench-mlp"
EXPERIMENT = "bench-serving"
HEALTH_TIMEOUT_S = 120.0
READY_TIMEOUT_S = 180.0
DEPLOYMENT_YAML = f"""\
name: {MODEL_NAME}
model: models:/{MODEL_NAME}/1
replicas: {{min: 1, max: 1}}
resources: {{cpus: 1}}
batching: {{max_batch_size: 32, max_wait_ms: 0}}
slo: {{p99_ms: 1000}}
max_queue: 4096
"""


def tracking_uri(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'mlflow.db'}"


def register_model(
    workdir: Path, model: Any = None, name: str = MODEL_NAME, pickle: bool = False
) -> str:
    """Log and register ``model`` (default: the bench MLP) as ``name`` in a fresh store under
    ``workdir``; its model URI. ``pickle`` keeps Python code in the model (a sleep, say)
    that the default serialization would trace away."""
    import mlflow
    from mlflow.models import infer_signature

    workdir.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri(workdir))
    experiment_id = mlflow.create_experiment(
        EXPERIMENT, artifact_location=(workdir / "artifacts").as_uri()
    )
    model = build_model() if model is None else model
    rows = example_rows(2)
    signature = infer_signature(rows, predict(model, rows))
    extra = {"serialization_format": "pickle"} if pickle else {}
    with mlflow.start_run(experiment_id=experiment_id, run_name=name):
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            signature=signature,
            input_example=rows,
            registered_model_name=name,
            **extra,
        )
    version = info.registered_model_version
    if str(version) != "1":
        raise RuntimeError(f"expected version 1 of {name} in a fresh store, got {version}")
    return f"models:/{name}/1"


def auth_headers(workdir: Path) -> dict[str, str]:
    """The admin token that `jobworker up` wrote under its home, as a request header."""
    return {"Authorization": f"Bearer {(workdir / 'jw' / 'admin.token').read_text().strip()}"}


def _deployment_ready(base: str, timeout_s: float, name: str, headers: dict[str, str]) -> None:
    """Poll ``GET /deployments/<name>`` until ``"state": "READY"``; on timeout, say why."""
    deadline = time.monotonic() + timeout_s
    last_body, last_error = "(no answer)", ""
    while time.monotonic() < deadline:
        try:
            resp = httpx.get(f"{base}/deployments/{name}", headers=headers, timeout=5.0)
            last_body, last_error = f"{resp.status_code} {resp.text}", ""
            if resp.status_code == 200 and resp.json().get("state") == "READY":
                return
        except (httpx.HTTPError, ValueError) as exc:
            last_error = f" (then: {exc!r})"
        time.sleep(0.5)
    raise RuntimeError(
        f"deployment {name} not READY within {timeout_s:.0f}s; last answer: {last_body}{last_error}"
    )


def start_jobworker(
    workdir: Path,
    log_dir: Path,
    env: Mapping[str, str],
    launched: list[ServerProcess],
    deployment_yaml: str = DEPLOYMENT_YAML,
    program: Sequence[str] | None = None,
) -> str:
    """``jobworker up`` serving ``deployment_yaml`` (default: ``models:/bench-mlp/1``); its
    predict URL. ``program`` replaces the ``jobworker`` command (``bench/serving_noauth.py``).

    ``env`` is the server's environment (without ``RAY_ADDRESS``: it must start its own
    local Ray). The server process is appended to ``launched`` as soon as it starts, so the caller
    can tear it down even when it never becomes ready.
    """
    port = free_port()
    uri = tracking_uri(workdir)
    env = {**env, "MLFLOW_TRACKING_URI": uri}
    cmd = [
        *(program or [str(Path(sys.executable).with_name("jobworker"))]),
        "up",
        "--home",
        str(workdir / "jw"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--tracking-uri",
        uri,
    ]
    server = launch(
        "jobworker", cmd, log_dir, env=env, markers=[str(workdir / "jw")], cwd=REPO_ROOT
    )
    launched.append(server)
    base = f"http://127.0.0.1:{port}"
    http_ok(server, f"{base}/healthz", HEALTH_TIMEOUT_S)
    headers = auth_headers(workdir)
    resp = httpx.post(
        f"{base}/deployments",
        content=deployment_yaml,
        headers={"content-type": "application/yaml", **headers},
        timeout=60.0,
    )
    if resp.status_code >= 300:
        raise server.fail(f"POST /deployments answered {resp.status_code}: {resp.text}")
    name = yaml.safe_load(deployment_yaml)["name"]
    try:
        _deployment_ready(base, READY_TIMEOUT_S, name, headers)
    except RuntimeError as exc:
        raise server.fail(str(exc)) from exc
    server.remember_descendants()
    return f"{base}/v1/models/{name}/predict"


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/bench_serving_mlflow")
    print(register_model(target), "in", tracking_uri(target))
