"""LossHistory (the console's sparklines) against a real MLflow (SQLite): a run's loss by
step, read once per ``ttl_s`` however often it is asked for (a fake clock)."""

from __future__ import annotations

from pathlib import Path

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from workers.mlflow_loss import LossHistory


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_losses_by_step_cached_for_the_ttl(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("losses")).info.run_id
    client.log_batch(run, metrics=[Metric("loss", v, 0, s) for s, v in ((2, 1.5), (1, 2.0))])
    clock = Clock()
    losses = LossHistory(uri, ttl_s=10, clock=clock)
    assert losses(run) == (2.0, 1.5)
    client.log_metric(run, "loss", 1.0, step=3)
    clock.now = 9.9
    assert losses(run) == (2.0, 1.5)  # cached: MLflow is not asked again yet
    clock.now = 10.0
    assert losses(run) == (2.0, 1.5, 1.0)
    assert losses("no-such-run") == ()  # MLflow's refusal is logged, nothing shown
