"""No code runs that nobody chose: models load from pt2 only, checkpoints weights-only.

Each hostile model or checkpoint would create a marker file if anything unpickled it; every
test asserts the marker is absent after the refusal. Real MLflow (SQLite), real Ray replicas
and a real control plane over HTTP where a deployment is involved.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import wait_until
from tests.integration.conftest import Api, make_api  # noqa: F401  (the fixture)
from tests.integration.serving_helpers import deploy, deploy_yaml, wait_deployment
from tests.security.models import (
    DIM,
    Registry,
    WritesMarker,
    linear,
    pickled_model_writing,
    pt2_model_writing,
)
from workers.interface.errors import CheckpointRefused, ModelUnavailable
from workers.mlflow_context import CHECKPOINT_DIR, MlflowJobContext, MlflowWaiter
from workers.mlflow_models import load


@pytest.fixture(autouse=True)
def _mlflow_uris_restored() -> Iterator[None]:
    """``load`` sets MLflow's process-wide tracking and registry URIs (and their variables):
    right in a replica's own process, but here they would outlive the test and send what
    later tests register to this module's MLflow."""
    tracking = mlflow.get_tracking_uri() if mlflow.tracking.is_tracking_uri_set() else None
    registry_variable = os.environ.get("MLFLOW_REGISTRY_URI")
    yield
    mlflow.set_registry_uri(None)  # type: ignore[arg-type]
    if registry_variable is None:  # MLflow sets the variable and never unsets it
        os.environ.pop("MLFLOW_REGISTRY_URI", None)
    else:
        os.environ["MLFLOW_REGISTRY_URI"] = registry_variable
    mlflow.set_tracking_uri(tracking)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """One MLflow for the module's tests (each logs its own runs)."""
    return Registry.create(tmp_path_factory.mktemp("registry"))


# -- models ---------------------------------------------------------------------------------
def test_pickled_model_is_refused_before_anything_is_unpickled(
    registry: Registry, tmp_path: Path
) -> None:
    marker = tmp_path / "pickled-model-ran"
    uri = pickled_model_writing(registry, marker)
    with pytest.raises(ModelUnavailable) as refused:
        load(uri, registry.tracking_uri, "cpu")
    message = str(refused.value)
    assert "pickled torch module" in message
    assert "serialization_format='pt2'" in message
    assert "allow_pickled_model: true" in message
    assert not marker.exists()


def test_pt2_archive_carrying_a_pickle_is_refused(registry: Registry, tmp_path: Path) -> None:
    marker = tmp_path / "pt2-record-ran"
    uri = pt2_model_writing(registry, marker)
    with pytest.raises(ModelUnavailable) as refused:
        load(uri, registry.tracking_uri, "cpu")
    message = str(refused.value)
    assert "not safe to load" in message and "sample_inputs/model.pt" in message
    assert "allow_pickled_model: true" in message
    assert "environment variable" not in message  # MLflow's advice is not the user's to take
    assert not marker.exists()


def test_model_shipping_python_code_is_refused(registry: Registry, tmp_path: Path) -> None:
    code = tmp_path / "helper_code.py"
    code.write_text("raise SystemExit('imported')\n")
    uri = registry.log("with-code", linear(), serialization_format="pt2", code_paths=[str(code)])
    with pytest.raises(ModelUnavailable, match="ships Python code"):
        load(uri, registry.tracking_uri, "cpu")


def test_pickled_model_loads_when_allowed(registry: Registry) -> None:
    model = linear()
    uri = registry.log("harmless-pickle", model, serialization_format="pickle")
    module, schema = load(uri, registry.tracking_uri, "cpu", allow_pickled_model=True)
    x = torch.randn(5, DIM)
    with torch.no_grad():
        assert torch.equal(module(x), model(x))
    assert schema is not None and schema.shape == (-1, DIM)


def test_pt2_model_loads_with_any_batch_size(registry: Registry) -> None:
    model = linear()
    uri = registry.log("pt2", model, serialization_format="pt2")
    module, schema = load(uri, registry.tracking_uri, "cpu")
    assert schema is not None and (schema.shape, schema.dtype) == ((-1, DIM), "float32")
    for rows in (1, 3, 64):
        x = torch.randn(rows, DIM)
        with torch.no_grad():
            assert torch.allclose(module(x), model(x))


@pytest.mark.timeout(240)
def test_deployment_of_a_pickled_model_fails_unless_allowed(
    make_api: Callable[..., Api],  # noqa: F811
    tmp_path: Path,
) -> None:
    """Through the API and a real Ray replica: refused with the message, no marker; the same
    control plane then serves a harmless pickled model an admin allowed."""
    api = make_api()
    registry = Registry.create(tmp_path / "models", api.tracking_uri)
    marker = tmp_path / "deployed-pickle-ran"
    evil = pickled_model_writing(registry, marker)
    harmless = registry.log("harmless-pickle", linear(), serialization_format="pickle")

    deploy(api, deploy_yaml("evil", evil))
    failed = wait_until(
        lambda: _failed(api, "evil"), "the deployment of the pickled model fails", 120
    )
    assert "pickled torch module" in failed["message"]
    assert "allow_pickled_model: true" in failed["message"]
    assert not marker.exists()

    deploy(api, deploy_yaml("allowed", harmless, allow_pickled_model="true"))
    wait_deployment(api, "allowed")
    answer = api.http.post("/v1/models/allowed/predict", json={"inputs": [[0.5] * DIM]})
    assert answer.status_code == 200, answer.text
    assert np.asarray(answer.json()["outputs"]).shape == (1, 3)
    assert not marker.exists()


def _failed(api: Api, name: str) -> dict[str, Any] | None:
    dep: dict[str, Any] = api.http.get(f"/deployments/{name}").json()
    return dep if dep["state"] == "FAILED" else None


# -- checkpoints ----------------------------------------------------------------------------
@pytest.fixture
def context(registry: Registry, tmp_path: Path) -> Iterator[Callable[[], MlflowJobContext]]:
    """Factory of job contexts on one run (a second one is a resumed attempt)."""
    client = MlflowClient(registry.tracking_uri)
    run_id = client.create_run(registry.experiment_id).info.run_id
    made: list[MlflowJobContext] = []

    def make() -> MlflowJobContext:
        work_dir = tmp_path / f"attempt-{len(made)}"
        work_dir.mkdir()
        run: Future[tuple[str, str]] = Future()
        run.set_result((run_id, registry.experiment_id))
        ctx = MlflowJobContext(
            client=client,
            run=run,
            work_dir=work_dir,
            gpu_ids=(),
            cpus=1,
            waiter=MlflowWaiter(registry.tracking_uri, threading.Event()),
        )
        made.append(ctx)
        return ctx

    yield make
    for ctx in made:
        ctx.close()


def _training_state() -> dict[str, Any]:
    """What jobs.train checkpoints: model and optimizer state after a step (Adam's holds
    tensors and plain values), step, epoch, metrics."""
    model = linear()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(8, DIM)).sum().backward()
    optimizer.step()
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": 7,
        "epoch": 1,
        "metrics": {"loss": 0.5, "accuracy": 0.75},
    }


def test_training_checkpoint_resumes_weights_only(
    context: Callable[[], MlflowJobContext],
) -> None:
    state = _training_state()
    first = context()
    first.save_checkpoint(state, step=7)
    assert first.close() == []
    restored = context().load_checkpoint()
    assert restored is not None
    loaded, step = restored
    assert step == 7 and loaded["metrics"] == state["metrics"]
    assert torch.equal(loaded["model"]["0.weight"], state["model"]["0.weight"])
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]


def test_checkpoint_with_code_is_refused_on_resume(
    context: Callable[[], MlflowJobContext], registry: Registry, tmp_path: Path
) -> None:
    marker = tmp_path / "checkpoint-ran"
    poison = tmp_path / "step-000000009.pt"
    torch.save({"step": 9, "extra": WritesMarker(marker)}, poison)
    ctx = context()
    MlflowClient(registry.tracking_uri).log_artifact(ctx.run_id, str(poison), CHECKPOINT_DIR)
    with pytest.raises(CheckpointRefused) as refused:
        ctx.load_checkpoint()
    message = str(refused.value)
    assert "step-000000009.pt" in message and "io.open" in message
    assert "weights_only=True" in message
    assert not marker.exists()


def test_saving_a_checkpoint_that_could_not_be_resumed_is_refused_at_once(
    context: Callable[[], MlflowJobContext],
) -> None:
    ctx = context()
    with pytest.raises(CheckpointRefused, match=r"state\['rng'\]\[1\] is a numpy.ndarray"):
        ctx.save_checkpoint({"step": 3, "rng": np.random.get_state()}, step=3)
    assert ctx.load_checkpoint() is None  # nothing half-written
