"""The API with its real stores (SQLite), MLflow's registry (SQLite) and real HTTP on
loopback, without Ray: authentication and authorization are decided before anything
reaches a worker. ``secure_api`` serves one; ``SecureApi.as_(team, role)`` is a client
with a new token. ``api`` is the whole control plane instead (Ray, MLflow, the loop), for
the tests of hostile input that must see other jobs still placed afterwards."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import uvicorn
from fastapi import FastAPI
from mlflow.tracking import MlflowClient

from scheduler import db
from scheduler.api.app import Serving, create_app
from scheduler.api.auth import Auth
from scheduler.auth.audit import AuditStore
from scheduler.auth.identity import PriorityCaps, Role
from scheduler.auth.model_names import ModelNames
from scheduler.auth.tokens import TokenStore
from scheduler.batch.service import JobService
from scheduler.batch.store import JobStore
from scheduler.realtime.metrics import ServingMetrics
from scheduler.realtime.router import Router
from scheduler.realtime.service import DeploymentService
from scheduler.realtime.store import DeploymentStore
from tests.conftest import wait_until
from tests.integration.conftest import (  # noqa: F401 (make_api: a fixture, used by name)
    Api,
    bearer,
    free_port,
    make_api,
)
from workers.interface.replicas import ResolvedModel
from workers.mlflow_models import resolve

CAPS = PriorityCaps(default=10, teams={"b": 60})


@dataclass
class SecureApi:
    engine: sa.Engine
    tokens: TokenStore
    jobs: JobStore
    deployments: DeploymentStore
    router: Router
    url: str
    tracking_uri: str
    admin: httpx.Client
    admin_token: str
    app: FastAPI

    def as_(self, team: str, role: Role = Role.MEMBER) -> httpx.Client:
        """A client with a new token of ``team`` and ``role``."""
        _, token = self.tokens.create(team, role, name=f"{role} of {team}")
        return self.client(token)

    def client(self, token: str | None) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, headers=bearer(token) if token else None)

    def register(self, name: str) -> None:
        """A registered model version in MLflow (no files: the control plane only asks
        the registry whether it exists)."""
        mlflow = MlflowClient(self.tracking_uri)
        mlflow.create_registered_model(name)
        mlflow.create_model_version(name, source="file:///nowhere", run_id=None)


def serve_app(app: FastAPI) -> tuple[uvicorn.Server, threading.Thread, str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), f"uvicorn on {port}", 30)
    assert server.started, f"uvicorn exited before serving on port {port}"
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture
def make_secure_api(tmp_path: Path) -> Iterator[Callable[..., SecureApi]]:
    servers: list[tuple[uvicorn.Server, threading.Thread, sa.Engine]] = []

    def make(store_url: str | None = None, metrics_public: bool = False) -> SecureApi:
        engine = db.connect(store_url or db.sqlite_url(tmp_path / "jobs.db"))
        tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        MlflowClient(tracking_uri).search_experiments()
        tokens = TokenStore(engine)
        names = ModelNames(engine)
        jobs = JobStore(engine)
        deployments = DeploymentStore(engine)
        metrics = ServingMetrics()
        router = Router(metrics)

        def resolver(uri: str) -> ResolvedModel:
            return resolve(uri, tracking_uri)

        service = JobService(jobs, tmp_path / "logs", lambda: None, names, priority_caps=CAPS)
        serving = Serving(
            DeploymentService(
                deployments, resolver, lambda _name: [], lambda: None, names, jobs.run_team
            ),
            router,
            metrics,
        )
        auth = Auth(tokens, AuditStore(engine), metrics_public=metrics_public)
        app = create_app(service, auth, cluster_view=dict, serving=serving, queue_view=list)
        server, thread, url = serve_app(app)
        servers.append((server, thread, engine))
        _, token = tokens.create("default", Role.ADMIN, name="test admin")
        admin = httpx.Client(base_url=url, timeout=30, headers=bearer(token))
        return SecureApi(
            engine, tokens, jobs, deployments, router, url, tracking_uri, admin, token, app
        )

    yield make
    for server, thread, engine in servers:
        server.should_exit = True
        thread.join(timeout=10)
        engine.dispose()


@pytest.fixture
def secure_api(make_secure_api: Callable[..., SecureApi]) -> SecureApi:
    return make_secure_api()


@pytest.fixture
def api(make_api: Callable[..., Api]) -> Api:  # noqa: F811
    """A whole control plane (Ray, MLflow, the loop) on loopback; its client is an admin."""
    return make_api()


@pytest.fixture
def api_headers(api: Api) -> dict[str, str]:
    """The admin's headers, for clients other than ``api.http`` (schemathesis)."""
    return bearer(api.admin_token)
