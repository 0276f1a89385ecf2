"""Registered models in MLflow: resolve a deployment's model URI, load it for serving.

The control plane resolves ``models:/name@alias`` to a version once and hands
replicas the pinned ``models:/name/<version>``, so that every replica of one
rollout step serves the same weights even while the alias moves.

No code runs that nobody chose. Replicas load the pytorch flavor saved with
``serialization_format="pt2"``: a ``torch.export`` program (``data/model.pt2``),
a graph of ATen operators and raw tensor weights, which loading does not turn
into Python calls. MLflow checks, before loading, that no record of the archive
is a pickle (``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false`` while jobworker
loads). A pickled model (``data/model.pth``: ``torch.save`` of the whole module,
whose unpickling may call anything) or one that ships Python code
(``code_paths``, put on ``sys.path``) is refused, read from its ``MLmodel`` file
and its file list before anything is loaded, unless the deployment sets
``allow_pickled_model: true`` (an admin's decision).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.tracking import MlflowClient

from workers.interface.channel import InputSchema
from workers.interface.errors import ModelUnavailable
from workers.interface.replicas import ResolvedModel

_ALLOW_PICKLE_ENV = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
_HOW_TO_FIX = (
    "jobworker loads pytorch models saved with serialization_format='pt2' (torch.export). "
    "Re-train the model with this jobworker (its jobs log pt2), or log it with "
    "mlflow.pytorch.log_model(model, name=..., input_example=..., serialization_format='pt2'); "
    "to serve it as it is, an admin sets allow_pickled_model: true on the deployment"
)


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


def load(
    uri: str, tracking_uri: str, device: str, allow_pickled_model: bool = False
) -> tuple[Any, InputSchema | None]:
    """The torch module behind a pinned URI, on ``device``, and its tensor input schema.

    Refuses (:class:`ModelUnavailable`) a model that is not pt2, unless
    ``allow_pickled_model``. ``mlflow.artifacts.download_artifacts``, ``Model.load``
    (the ``MLmodel`` YAML) and ``mlflow.pytorch.load_model``.
    """
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        with tempfile.TemporaryDirectory(prefix="jobworker-model-") as tmp:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
            info = Model.load(str(local / "MLmodel"))
            flavor = info.flavors.get("pytorch")
            if flavor is None:
                raise ModelUnavailable(
                    f"{uri} has flavors {sorted(info.flavors)}; jobworker serves the pytorch flavor"
                )
            unsafe = unsafe_parts(local, flavor)
            if unsafe and not allow_pickled_model:
                raise ModelUnavailable(f"{uri} is not safe to load: {unsafe}. {_HOW_TO_FIX}")
            with _pickle_allowed(allow_pickled_model):
                module = mlflow.pytorch.load_model(str(local), map_location=device)
    except MlflowException as exc:
        message = exc.message.rstrip(".")
        if "pickle" not in message:
            raise ModelUnavailable(f"{uri}: {message}") from exc
        # MLflow found a pickle inside a pt2 archive; its advice (an environment variable)
        # is not the user's to follow.
        message = message.split(". You can set environment variable")[0]
        raise ModelUnavailable(f"{uri} is not safe to load: {message}. {_HOW_TO_FIX}") from exc
    # An exported program loads where it was saved (jobs save on CPU); a pickled module
    # was mapped to the device already.
    module = module.to(device)
    return module, _schema(info.signature)


def unsafe_parts(model_dir: Path, flavor: dict[str, Any]) -> str | None:
    """What in a downloaded pytorch model would run code when loaded, or None (pt2 only).

    Read from the flavor's config and the file list; nothing is unpickled.
    """
    data = model_dir / str(flavor.get("model_data", "data"))
    found = []
    if (data / "model.pth").exists() or not (data / "model.pt2").is_file():
        found.append(
            "it is a pickled torch module (serialization_format='pickle', data/model.pth), "
            "and unpickling it may call any Python function"
        )
    if flavor.get("code"):
        found.append(f"it ships Python code ({flavor['code']}/) that loading puts on sys.path")
    return "; ".join(found) or None


@contextlib.contextmanager
def _pickle_allowed(allowed: bool) -> Iterator[None]:
    """MLflow's own switch, set for one load: off, it checks that a pt2 archive holds no
    pickle and refuses a pickled model."""
    before = os.environ.get(_ALLOW_PICKLE_ENV)
    os.environ[_ALLOW_PICKLE_ENV] = "true" if allowed else "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(_ALLOW_PICKLE_ENV, None)
        else:
            os.environ[_ALLOW_PICKLE_ENV] = before


def _schema(signature: Any) -> InputSchema | None:
    """The single tensor input of a signature; None when the model has no tensor signature."""
    inputs = signature.inputs if signature is not None else None
    if inputs is None or not inputs.is_tensor_spec() or len(inputs.inputs) != 1:
        return None
    spec = inputs.inputs[0]
    return InputSchema(shape=tuple(int(d) for d in spec.shape), dtype=str(spec.type))
