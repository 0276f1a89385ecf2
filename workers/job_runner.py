"""The job process: ``python -m workers.job_runner WORK_DIR``.

Started by the training worker actor with ``CUDA_VISIBLE_DEVICES`` and the
thread limits already in its environment. It reads ``launch.json``, runs the
``jobs/`` training loop (or the user's entrypoint) with an MLflow-backed
context, logs and registers the model, and writes ``result.json``. Its stdout
and stderr are the job's log. SIGTERM asks it to checkpoint and stop.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import mlflow
import torch
from mlflow.entities import Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from jobs.context import StopRequested
from jobs.train import TrainResult, train
from workers.files import write_json_atomic
from workers.interface.executor import LaunchRequest
from workers.interface.spec import TrainingSpec
from workers.mlflow_context import MlflowJobContext

_MAX_PARAMS = 100  # MLflow's limit of params per log_batch call


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 0.1}}`` → ``{"train.lr": "0.1"}``, for MLflow params."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if not isinstance(value, str) else value
    return out


def _experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created if it does not exist yet.

    Idempotent: jobs of a new experiment that start together all race to create
    it; the losers read back the winner's (``RESOURCE_ALREADY_EXISTS``).
    """
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    try:
        return str(client.create_experiment(name))
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    found = client.get_experiment_by_name(name)
    if found is None:  # created and deleted meanwhile: nothing sensible to report to
        raise RuntimeError(f"MLflow experiment {name!r} vanished while it was being created")
    return str(found.experiment_id)


def _find_run(client: MlflowClient, experiment_id: str, job_id: str) -> str | None:
    """The run of job ``job_id`` in the experiment, found by its ``jobworker.job_id`` tag."""
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`jobworker.job_id` = '{job_id}'", max_results=1
    )
    return str(found[0].info.run_id) if found else None


def _open_run(client: MlflowClient, launch: LaunchRequest) -> tuple[str, str]:
    """The run to report to, ``(run_id, experiment_id)``: the job's own on a resume.

    A job whose run id the scheduler never learnt (it crashed first) finds its
    run by the ``jobworker.job_id`` tag, so that no job ever gets two runs.
    """
    spec = launch.spec
    experiment_id = _experiment_id(client, spec.experiment)
    run_id = launch.run_id or _find_run(client, experiment_id, launch.job_id)
    if run_id is not None:
        run = client.get_run(run_id)
        _record_resume(client, run_id, launch)
        return run.info.run_id, run.info.experiment_id
    tags = {"mlflow.runName": spec.name, **spec.tags, **launch.tags}
    run = client.create_run(experiment_id, tags=tags)
    spec_data = spec.model_dump(mode="json")
    params = [Param(k, v[:6000]) for k, v in flatten(spec_data).items()]
    for i in range(0, len(params), _MAX_PARAMS):
        client.log_batch(run.info.run_id, params=params[i : i + _MAX_PARAMS])
    client.log_text(run.info.run_id, launch.source_text, "config.yaml")
    return run.info.run_id, experiment_id


def _follow_run(client: MlflowClient, launch: LaunchRequest) -> tuple[str, str]:
    """A rank > 0 of a multi-node job: the run rank 0 opened (found by the job-id tag)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if launch.run_id:
            run = client.get_run(launch.run_id)
            return run.info.run_id, run.info.experiment_id
        experiment = client.get_experiment_by_name(launch.spec.experiment)
        if experiment is not None:
            run_id = _find_run(client, experiment.experiment_id, launch.job_id)
            if run_id is not None:
                return run_id, experiment.experiment_id
        time.sleep(0.5)
    raise RuntimeError(f"rank 0 of {launch.job_id} opened no MLflow run within 300 s")


def _record_resume(client: MlflowClient, run_id: str, launch: LaunchRequest) -> None:
    """Tag the run with this attempt and why the job came back (preemption, worker lost)."""
    tags = {k: v for k, v in launch.tags.items() if k != "jobworker.queue_wait_s"}
    tags[f"jobworker.resume.{launch.attempt}"] = launch.resume_reason or "resumed"
    if launch.preemptions:
        tags["jobworker.preemptions"] = str(launch.preemptions)
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def _run_program(ctx: MlflowJobContext, spec: TrainingSpec) -> TrainResult | None:
    if spec.entrypoint:
        module_name, _, attr = spec.entrypoint.partition(":")
        fn = getattr(importlib.import_module(module_name), attr)
        result = fn(ctx, dict(spec.config))
        return result if isinstance(result, TrainResult) else None
    return train(ctx, spec.train_params())


def _log_model(
    client: MlflowClient, result: TrainResult, register_as: str | None, alias: str | None
) -> str | None:
    model = result.model.to("cpu").eval()
    example = result.example_input.to("cpu")
    with torch.no_grad():
        output = model(example)
    signature = infer_signature(example.numpy(), output.numpy())
    info = mlflow.pytorch.log_model(
        model,
        name="model",
        signature=signature,
        input_example=example.numpy(),
        registered_model_name=register_as,
        # Declared, not inferred: inference loads the model in a subprocess (seconds).
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
    )
    version = info.registered_model_version
    if version is None:
        return None
    if register_as and alias:
        client.set_registered_model_alias(register_as, alias, str(version))
    return str(version)


def _exit_with_parent() -> None:
    """Die with the worker actor: an orphaned job would hold its GPUs unseen."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(70)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(work_dir: Path) -> int:
    _exit_with_parent()
    launch = LaunchRequest.model_validate_json((work_dir / "launch.json").read_text())
    spec = launch.spec
    cpus = spec.resources.cpus
    torch.set_num_threads(cpus)
    mlflow.set_tracking_uri(launch.tracking_uri)
    client = MlflowClient(launch.tracking_uri)
    result_path = work_dir / "result.json"
    leader = launch.leader
    run_id, experiment_id = _open_run(client, launch) if leader else _follow_run(client, launch)
    ctx = MlflowJobContext(
        client=client,
        run_id=run_id,
        experiment_id=experiment_id,
        work_dir=work_dir,
        gpu_ids=launch.node.gpu_indices,
        cpus=cpus,
        leader=leader,
    )
    if leader:
        # MLflow's own system-metrics monitor (CPU, memory, and GPU through NVML when present).
        mlflow.set_system_metrics_sampling_interval(2)  # type: ignore[no-untyped-call]
        mlflow.set_system_metrics_samples_before_logging(1)  # type: ignore[no-untyped-call]
        mlflow.start_run(run_id=run_id, log_system_metrics=True)

    def on_sigterm(_signum: int, _frame: FrameType | None) -> None:
        ctx.request_stop()

    signal.signal(signal.SIGTERM, on_sigterm)
    print(
        f"jobworker: job {launch.job_id} attempt {launch.attempt} run {run_id} "
        f"gpus={list(launch.node.gpu_indices)} cpus={cpus} "
        f"rank {launch.rank} of {launch.world_size}",
        flush=True,
    )
    outcome: dict[str, Any] = {"run_id": run_id}
    status = "FINISHED"
    try:
        result = _run_program(ctx, spec)
        if result is not None and leader:
            outcome["metrics"] = result.metrics
            outcome["model_version"] = _log_model(
                client, result, spec.register_as, spec.register_alias
            )
        outcome["status"] = "succeeded"
    except StopRequested:
        outcome["status"] = "stopped"
        status = "KILLED"
    except BaseException as exc:
        traceback.print_exc()
        outcome.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        status = "FAILED"
    finally:
        logging_errors = ctx.close()
        for err in logging_errors:
            print(f"jobworker: {err}", file=sys.stderr, flush=True)
        if leader:
            client.set_tag(run_id, "jobworker.outcome", outcome.get("status", "failed"))
            mlflow.end_run(status=status)
        write_json_atomic(result_path, outcome)
    return 0 if outcome["status"] != "failed" else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
