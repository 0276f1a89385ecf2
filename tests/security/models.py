"""Models and checkpoints for the security tests: safe ones, and pickles that would leave a
marker file behind if anything unpickled them.

Everything is logged to a real MLflow (SQLite, artifacts under the test's tmp_path).
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

DIM = 4


class WritesMarker:
    """Unpickled, it opens (so creates) ``path``: what any code in a pickle could do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return open, (str(self.path), "w")


@dataclass(frozen=True)
class Registry:
    """A real MLflow tracking store on SQLite with one experiment whose artifacts are local."""

    tracking_uri: str
    experiment_id: str
    root: Path

    @classmethod
    def create(cls, root: Path, tracking_uri: str | None = None) -> Registry:
        """On ``tracking_uri`` (default: a new SQLite file under ``root``)."""
        tracking_uri = tracking_uri or f"sqlite:///{root / 'mlflow.db'}"
        client = MlflowClient(tracking_uri)
        experiment_id = client.create_experiment(
            "security", artifact_location=(root / "artifacts").as_uri()
        )
        return cls(tracking_uri, experiment_id, root)

    def log_dir(self, model_dir: Path) -> str:
        """``model_dir`` (a saved MLflow model) as the artifact ``model`` of a new run."""
        client = MlflowClient(self.tracking_uri)
        run_id = client.create_run(self.experiment_id).info.run_id
        client.log_artifacts(run_id, str(model_dir), "model")
        client.set_terminated(run_id)
        return f"runs:/{run_id}/model"

    def save(self, name: str, model: torch.nn.Module, **kwargs: Any) -> Path:
        """``mlflow.pytorch.save_model`` of ``model`` (``DIM`` float inputs) under the root."""
        example = torch.randn(3, DIM)
        with torch.no_grad():
            output = model(example)
        self.root.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.root)) / "model"
        mlflow.pytorch.save_model(
            model,
            str(path),
            signature=infer_signature(example.numpy(), output.numpy()),
            input_example=example.numpy(),
            pip_requirements=["torch"],
            **kwargs,
        )
        return path

    def log(self, name: str, model: torch.nn.Module, **kwargs: Any) -> str:
        return self.log_dir(self.save(name, model, **kwargs))


def linear() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(DIM, 3))


def pickled_model_writing(registry: Registry, marker: Path) -> str:
    """A pickled pytorch model (``data/model.pth``) whose unpickling creates ``marker``."""
    path = registry.save("evil-pickle", linear(), serialization_format="pickle")
    torch.save(WritesMarker(marker), path / "data" / "model.pth")
    return registry.log_dir(path)


def pt2_model_writing(registry: Registry, marker: Path) -> str:
    """A pt2 model whose archive carries one record that unpickling turns into ``marker``
    (its sample inputs, which ``torch.export.load`` reads with ``weights_only=False``)."""
    path = registry.save("evil-pt2", linear(), serialization_format="pt2")
    archive = path / "data" / "model.pt2"
    original = archive.with_suffix(".orig")
    shutil.move(archive, original)
    poison = path / "poison.pt"
    torch.save(WritesMarker(marker), poison)
    with zipfile.ZipFile(original) as src, zipfile.ZipFile(archive, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data/sample_inputs/model.pt"):
                data = poison.read_bytes()
            dst.writestr(info, data)
    original.unlink()
    poison.unlink()
    return registry.log_dir(path)
