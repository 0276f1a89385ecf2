"""A real control plane per test: Ray (session), SQLite store (or PostgreSQL: ``db_url``),
MLflow on SQLite, HTTP."""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from mlflow.tracking import MlflowClient

from scheduler.auth.identity import Role
from scheduler.batch.store import JobRecord
from scheduler.core.states import JobState
from scheduler.wiring import ControlPlane, Settings, build
from tests.conftest import REPO, wait_until

TRAIN_YAML = """
name: {name}
experiment: {experiment}
model: {{name: mlp, options: {{hidden: [32]}}}}
data: {{name: synthetic_classification, options: {{n_samples: 256}}}}
train: {{max_steps: {steps}, batch_size: 32, lr: 0.01, checkpoint_every_steps: 10}}
resources: {{gpus: {gpus}, gpu_memory_gb: {gpu_memory_gb}, cpus: 1, memory_gb: 1}}
register_as: {register_as}
"""


def entrypoint_yaml(
    name: str,
    fn: str,
    *,
    cpus: int = 1,
    gpus: int = 0,
    gpu_memory_gb: float = 1,
    gpu_type: str | None = None,
    **config: Any,
) -> str:
    gpu = f", gpu_memory_gb: {gpu_memory_gb}" if gpus else ""
    if gpu_type:
        gpu += f", gpu_type: {gpu_type}"
    return (
        f"name: {name}\nexperiment: it\nentrypoint: tests.integration.user_code:{fn}\n"
        f"config: {config or {}}\ntrain: {{max_steps: 1}}\n"
        f"resources: {{gpus: {gpus}{gpu}, cpus: {cpus}, memory_gb: 1}}\n"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bearer(token: str) -> dict[str, str]:
    """The ``Authorization`` header that carries ``token``."""
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Api:
    """A control plane served over real HTTP on loopback; ``http`` carries the admin
    token that the control plane wrote to ``admin_token``'s file under ``home``."""

    plane: ControlPlane
    http: httpx.Client
    home: Path
    tracking_uri: str
    namespace: str
    admin_token: str

    def client_as(self, team: str, role: Role = Role.MEMBER) -> httpx.Client:
        """An HTTP client with a new token of ``team`` and ``role``."""
        _, token = self.plane.tokens.create(team, role, name=f"test {role} of {team}")
        return httpx.Client(base_url=self.http.base_url, timeout=30, headers=bearer(token))

    def wait_for(self, job_id: str, states: set[JobState], timeout_s: float = 120.0) -> JobRecord:
        """The job once it is in one of ``states``."""

        def reached() -> JobRecord | None:
            job = self.plane.store.get(job_id)
            return job if job.state in states else None

        try:
            return wait_until(reached, f"{job_id} in {sorted(states)}", timeout_s, every_s=0.2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: it is {self.plane.store.get(job_id).state}") from None

    def mlflow(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)


def serve(plane: ControlPlane) -> tuple[uvicorn.Server, threading.Thread, str]:
    port = free_port()
    config = uvicorn.Config(plane.app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(
        lambda: server.started or not thread.is_alive(), f"uvicorn starts on port {port}", 30
    )
    if not server.started:
        raise RuntimeError(f"uvicorn exited before serving on port {port}")
    return server, thread, f"http://127.0.0.1:{port}"


def start_api(
    home: Path,
    namespace: str,
    cluster: str = "local_sim.yaml",
    db_url: str | None = None,
    mlflow_ui_url: str | None = None,
    **overrides: Any,
) -> tuple[Api, Callable[[], None]]:
    """A control plane on ``home`` served over HTTP, and the function that stops it (and
    releases what its executor still runs). ``mlflow_ui_url``: where links to MLflow point
    (none by default: the tracking URI is a SQLite file); ``overrides``: other
    :class:`Settings` fields. Unless overridden, no warm job processes (each costs this
    small machine seconds of CPU) and no SLO guard (it would pause the training of any test
    that also sends predictions whenever the loaded machine's p99 nears the SLO; its own
    tests turn it on)."""
    overrides = {"warm_pool": 0, "slo_guard": False, **overrides}
    tracking_uri = f"sqlite:///{home / 'mlflow.db'}"
    MlflowClient(tracking_uri).search_experiments()  # create MLflow's tables once, here
    settings = Settings(
        home=home,
        db_url=db_url,
        tracking_uri=tracking_uri,
        cluster_config=REPO / "configs" / "cluster" / cluster,
        gpu_backend="simulated",
        namespace=namespace,
        loop_interval_s=0.2,
        mlflow_ui_url=mlflow_ui_url,
        **overrides,
    )
    plane = build(settings)
    plane.start()
    server, thread, url = serve(plane)
    token = settings.admin_token_file.read_text().strip()
    http = httpx.Client(base_url=url, timeout=30, headers=bearer(token))

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)
        plane.stop()
        for job_id in plane.executor.active():
            plane.executor.release(job_id)

    return Api(plane, http, home, tracking_uri, namespace, token), stop


@pytest.fixture
def make_api(ray_session: None, tmp_path: Path) -> Iterator[Callable[..., Api]]:
    """Build (and later stop) control planes; each call may reuse the same home.

    ``db_url`` puts the job store there instead of SQLite under ``home`` (a test on
    PostgreSQL requests ``store_url`` or ``postgres_url`` before ``make_api``, so its
    control planes stop before the database is dropped).
    """
    stops: list[Callable[[], None]] = []
    namespace = f"jw-test-{uuid.uuid4().hex[:8]}"

    def make(
        home: Path = tmp_path,
        cluster: str = "local_sim.yaml",
        db_url: str | None = None,
        **overrides: Any,
    ) -> Api:
        api, stop = start_api(home, namespace, cluster, db_url, **overrides)
        stops.append(stop)
        return api

    yield make
    for stop in stops:
        stop()


@pytest.fixture
def api(make_api: Callable[..., Api]) -> Api:
    return make_api()
