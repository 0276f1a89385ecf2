"""A frozen MLflow server never freezes the reconcile loop.

MLflow here is a real socket that accepts connections and never answers, as a
server stopped with SIGSTOP does; the MLflow client, the deployment store
(SQLite) and the router are real. No replica is started: the model never resolves.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scheduler import db
from scheduler.core.model import ClusterSnapshot, PlacementPolicy
from scheduler.core.states import DeploymentState
from scheduler.realtime.controller import DeploymentController, ServeSettings
from scheduler.realtime.metrics import ServingMetrics
from scheduler.realtime.router import Router
from scheduler.realtime.spec import load_deployment
from scheduler.realtime.store import DeploymentStore
from tests.conftest import REPO, wait_until
from workers.interface.replicas import ResolvedModel
from workers.mlflow_models import resolve


@pytest.fixture
def frozen_mlflow(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A listening socket nobody answers on; the client gives up after 5 s, no retries."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    listener = socket.create_server(("127.0.0.1", 0), backlog=16)
    yield listener
    listener.close()


class NoReplicas:
    """The model never resolves here, so no replica may be started, polled or stopped."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the launcher was asked to {name}")


def test_a_frozen_mlflow_server_stalls_no_pass(
    frozen_mlflow: socket.socket, tmp_path: Path
) -> None:
    tracking_uri = f"http://127.0.0.1:{frozen_mlflow.getsockname()[1]}"
    store = DeploymentStore(db.connect(db.sqlite_url(tmp_path / "jobs.db")))
    text = (REPO / "configs/serve/mlp_synthetic.yaml").read_text()
    store.put(load_deployment(text), text)
    now = [0.0]

    def resolver(uri: str) -> ResolvedModel:
        return resolve(uri, tracking_uri)

    controller = DeploymentController(
        store,
        NoReplicas(),  # type: ignore[arg-type]
        Router(ServingMetrics()),
        ServingMetrics(),
        resolver,
        ServeSettings(tracking_uri=tracking_uri, resolve_wait_s=0.2, resolve_slow_s=10),
        clock=lambda: now[0],
    )

    def reconcile() -> None:
        controller.reconcile(lambda: ClusterSnapshot(nodes=(), holdings=()), PlacementPolicy())

    try:
        reconcile()  # asks MLflow, waits 0.2 s for the answer, goes on without it
        now[0] = 20.0
        reconcile()  # still no answer: the status says so; no second question is asked
        record = store.get("mlp-synthetic")
        assert record.state is DeploymentState.DEPLOYING
        assert "MLflow has not answered for 20 s" in (record.message or "")

        # The client gives up (its timeout): the late answer is taken at a later pass.
        def failed() -> bool:
            reconcile()
            return store.get("mlp-synthetic").state is DeploymentState.FAILED

        wait_until(failed, "the deployment to report MLflow's error", timeout_s=60)
        assert "cannot resolve the model" in (store.get("mlp-synthetic").message or "")
    finally:
        controller.close()
