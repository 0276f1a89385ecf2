"""The experiment-review notebook, executed for real against a temporary MLflow.

The test logs a few runs itself (params, tags and ``loss`` step histories,
through ``MlflowClient.log_batch``) to ``sqlite:///{tmp_path}/mlflow.db``,
runs ``notebooks/experiment_review.ipynb`` with nbclient on the ``python3``
kernel (jupyter_client starts it with this interpreter, so it sees this
venv), and checks what the notebook really printed and drew.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbclient
import nbformat
import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "experiment_review.ipynb"
EXPERIMENT = "review-test"
BEST_PREFIX = "best run by final loss: "


@dataclass(frozen=True)
class FakeRun:
    """A run to log: its name, training params, final status and loss per step."""

    name: str
    lr: float
    batch_size: int
    status: str
    losses: tuple[float, ...]
    accuracy: float


RUNS = (
    # The lowest loss *ever* is here (0.05 at step 2), but its final loss is not the lowest:
    # the notebook must rank by the final value.
    FakeRun("mlp-lr0.1-alpha", 0.1, 32, "FINISHED", (2.0, 0.6, 0.05, 0.9), 0.61),
    FakeRun("mlp-lr0.01-bravo", 0.01, 64, "FINISHED", (2.1, 1.2, 0.5, 0.2), 0.93),
    # Lower final losses than the best, but not succeeded: a failed run and a cancelled one
    # (jobworker ends a cancelled or stopped job's run KILLED). Neither may be picked.
    FakeRun("cnn-lr0.001-charlie", 0.001, 128, "FAILED", (2.3, 1.9, 0.1), 0.42),
    FakeRun("mlp-lr0.02-delta", 0.02, 64, "KILLED", (2.0, 0.9, 0.01), 0.97),
)
BEST = "mlp-lr0.01-bravo"


def _log_runs(tracking_uri: str, artifact_root: Path) -> dict[str, str]:
    """Create the experiment and its runs; returns run name → run id."""
    client = MlflowClient(tracking_uri)
    experiment_id = client.create_experiment(EXPERIMENT, artifact_location=artifact_root.as_uri())
    ids: dict[str, str] = {}
    now_ms = int(time.time() * 1000)
    for i, fake in enumerate(RUNS):
        model = fake.name.split("-", 1)[0]
        run = client.create_run(
            experiment_id,
            tags={"mlflow.runName": fake.name},
        )
        run_id = run.info.run_id
        metrics = [
            Metric("loss", value, now_ms + step, step) for step, value in enumerate(fake.losses)
        ]
        metrics.append(Metric("accuracy", fake.accuracy, now_ms, len(fake.losses) - 1))
        client.log_batch(
            run_id,
            metrics=metrics,
            params=[
                Param("model.name", model),
                Param("train.lr", str(fake.lr)),
                Param("train.batch_size", str(fake.batch_size)),
            ],
            tags=[RunTag("jobworker.job_id", f"job-{i:04d}")],
        )
        client.set_terminated(run_id, status=fake.status)
        ids[fake.name] = run_id
    return ids


def _texts(cell: Any) -> str:
    """Everything a code cell showed as text: streams, plain text and HTML."""
    parts: list[str] = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif out["output_type"] in ("display_data", "execute_result"):
            data = out["data"]
            parts.extend(str(data[key]) for key in ("text/plain", "text/html") if key in data)
    return "\n".join(parts)


def _cell_with(nb: Any, needle: str) -> Any:
    """The one code cell whose source contains ``needle``."""
    found = [c for c in nb.cells if c.cell_type == "code" and needle in c.source]
    assert len(found) == 1, f"expected one cell containing {needle!r}, found {len(found)}"
    return found[0]


@pytest.fixture
def executed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, dict[str, str]]:
    """The notebook after a run against a fresh MLflow holding :data:`RUNS`."""
    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    ids = _log_runs(tracking_uri, tmp_path / "artifacts")
    # The kernel is a child process: it inherits this environment.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.setenv("JOBWORKER_EXPERIMENT", EXPERIMENT)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=300,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    return nb, ids


def test_committed_notebook_has_no_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], "clear the notebook's outputs before committing"
            assert cell.execution_count is None


def test_notebook_reviews_the_experiment(executed: tuple[Any, dict[str, str]]) -> None:
    nb, ids = executed
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out["output_type"] == "error"
    ]
    assert not errors

    table = _texts(_cell_with(nb, "search_runs"))
    assert f"{len(RUNS)} runs" in table
    for fake in RUNS:
        assert fake.name in table
        assert ids[fake.name] in table
    assert "FAILED" in table
    assert "KILLED" in table
    assert "job-0001" in table

    plot = _cell_with(nb, "get_metric_history")
    pngs = [
        out["data"]["image/png"]
        for out in plot.outputs
        if out["output_type"] in ("display_data", "execute_result") and "image/png" in out["data"]
    ]
    assert len(pngs) == 1
    assert len(pngs[0]) > 1000  # base64 of a real figure, not an empty placeholder
    assert f"{len(RUNS)} runs with a loss history" in _texts(plot)

    lines = [line for line in _texts(_cell_with(nb, "idxmin")).splitlines() if BEST_PREFIX in line]
    assert len(lines) == 1
    named = lines[0].split(BEST_PREFIX, 1)[1].split(" (", 1)[0]
    assert named == BEST
    assert ids[BEST] in lines[0]
