"""Registered models in MLflow: resolve a deployment's model URI, load it for serving.

The control plane resolves ``models:/name@alias`` to a version once and hands
replicas the pinned ``models:/name/<version>``, so that every replica of one
rollout step serves the same weights even while the alias moves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from workers.interface.errors import ModelUnavailable
from workers.interface.replicas import ResolvedModel


@dataclass(frozen=True)
class InputSchema:
    """The model's tensor input: ``shape`` with -1 for any size, numpy dtype name."""

    shape: tuple[int, ...]
    dtype: str


def resolve(model_uri: str, tracking_uri: str) -> ResolvedModel:
    """Pin ``model_uri`` to a version; raises :class:`ModelUnavailable` naming what is missing.

    ``MlflowClient().get_model_version_by_alias`` / ``get_model_version`` /
    ``get_run`` under the hood.
    """
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    rest = model_uri.removeprefix("models:/")
    try:
        if model_uri.startswith("runs:/"):
            run_id = model_uri.removeprefix("runs:/").split("/", 1)[0]
            client.get_run(run_id)
            return ResolvedModel(uri=model_uri, name=None, version=None, run_id=run_id)
        if "@" in rest:
            name, alias = rest.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, version = rest.split("/", 1)
            mv = client.get_model_version(name, version)
    except MlflowException as exc:
        raise ModelUnavailable(f"{model_uri}: {exc.message}") from exc
    return ResolvedModel(
        uri=f"models:/{mv.name}/{mv.version}",
        name=mv.name,
        version=str(mv.version),
        run_id=mv.run_id,
    )


def load(uri: str, tracking_uri: str, device: str) -> tuple[Any, InputSchema | None]:
    """The torch module behind a pinned URI, on ``device``, and its tensor input schema.

    ``mlflow.pytorch.load_model`` and ``mlflow.models.get_model_info``.
    """
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        info = mlflow.models.get_model_info(uri)
        if "pytorch" not in info.flavors:
            raise ModelUnavailable(
                f"{uri} has flavors {sorted(info.flavors)}; jobworker serves the pytorch flavor"
            )
        module = mlflow.pytorch.load_model(uri, map_location=device)
    except MlflowException as exc:
        raise ModelUnavailable(f"{uri}: {exc.message}") from exc
    return module, _schema(info.signature)


def _schema(signature: Any) -> InputSchema | None:
    """The single tensor input of a signature; None when the model has no tensor signature."""
    inputs = signature.inputs if signature is not None else None
    if inputs is None or not inputs.is_tensor_spec() or len(inputs.inputs) != 1:
        return None
    spec = inputs.inputs[0]
    return InputSchema(shape=tuple(int(d) for d in spec.shape), dtype=str(spec.type))
