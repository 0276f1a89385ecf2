"""The job process: ``python -m workers.job_runner WORK_DIR``.

Started by the training worker actor with ``CUDA_VISIBLE_DEVICES`` and the
thread limits already in its environment, or, as ``job_runner --warm``, started
before its job with everything imported and handed the job's environment later
(:mod:`workers.warm_process`). The MLflow run is opened in a thread while the
program starts: metrics wait in memory and checkpoints for the spool until it
is open; a user entrypoint starts once it is its thread's active run.

It reads ``launch.json``, runs the ``jobs/`` training loop (or the user's
entrypoint) with an MLflow-backed context, logs and registers the model, and
writes ``result.json``. Its stdout and stderr are the job's log. SIGTERM asks it
to checkpoint and stop.

MLflow being down never fails the job: opening the run, logging the model
and ending the run wait for it (retrying with backoff, the output saying
``waiting for MLflow at <uri>: <error>``), and metrics and checkpoints wait in
the job's spool on local disk while training goes on (see
:mod:`workers.mlflow_context` for what is an outage and what is a refusal,
and how each step and the model are recorded once). The spool holds at most
``JOBWORKER_SPOOL_MAX_BYTES`` (default 256 MiB).

At its end the leader tags the run, in one ``log_batch``, with
``jobworker.outcome``, ``jobworker.actual_duration_s`` (the job's run time so
far: this attempt's, from the process start to the end of the run, added to
what the attempts before it tagged; an attempt killed before its end adds
nothing) and ``jobworker.peak_gpu_memory_gb`` (the most GPU memory this
process reserved on any one of its GPUs, ``torch.cuda.max_memory_reserved``,
the largest over the attempts; absent without CUDA. Simulated GPUs measure
nothing: their per-process reading is the job's own request echoed back).
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from types import FrameType
from typing import Any

import mlflow
import torch
from mlflow.entities import LoggedModelStatus, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from jobs.context import StopRequested
from jobs.train import TrainResult, train
from workers.files import write_json_atomic
from workers.gpu_caps import cap_job_process
from workers.interface.errors import MlflowRefused
from workers.interface.executor import LaunchRequest
from workers.interface.history import ACTUAL_DURATION_TAG, PEAK_GPU_MEMORY_TAG
from workers.interface.spec import TrainingSpec
from workers.interface.telemetry import GIB
from workers.mlflow_context import DEFAULT_SPOOL_MAX_BYTES, MlflowJobContext, MlflowWaiter
from workers.mlflow_spool import SPOOL_DIR
from workers.warm_process import TRACKING_URI_VAR, wait_for_job

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


def run_description(public_url: str, job_id: str) -> str:
    """The run's MLflow description (markdown): a link to the job's console page."""
    return f"jobworker job [{job_id}]({public_url.rstrip('/')}/ui/jobs/{job_id})"


def version_tags(launch: LaunchRequest, run_id: str) -> dict[str, str]:
    """Tags of the model version a job registers: the job, its team and its run."""
    return {
        "jobworker.job_id": launch.job_id,
        "jobworker.team": launch.spec.team,
        "jobworker.run_id": run_id,
    }


def _find_run(client: MlflowClient, experiment_id: str, job_id: str) -> str | None:
    """The run of job ``job_id`` in the experiment, found by its ``jobworker.job_id`` tag."""
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`jobworker.job_id` = '{job_id}'", max_results=1
    )
    return str(found[0].info.run_id) if found else None


def _open_run(client: MlflowClient, launch: LaunchRequest, wait: MlflowWaiter) -> tuple[str, str]:
    """The run to report to, ``(run_id, experiment_id)``: the job's own on a resume.

    A job whose run id the scheduler never learnt (it crashed first) finds its
    run by the ``jobworker.job_id`` tag, so that no job ever gets two runs.
    Every call waits out MLflow outages; each is safe to repeat.
    """
    spec = launch.spec
    experiment_id = wait.call(
        f"find or create experiment {spec.experiment!r}",
        lambda: _experiment_id(client, spec.experiment),
    )
    run_id = launch.run_id or wait.call(
        "look up the job's run", lambda: _find_run(client, experiment_id, launch.job_id)
    )
    if run_id is not None:
        resumed = run_id
        run = wait.call("read the run", lambda: client.get_run(resumed))
        wait.call("record the resume", lambda: _record_resume(client, resumed, launch))
        return run.info.run_id, run.info.experiment_id
    tags = {"mlflow.runName": spec.name, **spec.tags, **launch.tags}
    if launch.public_url:
        tags["mlflow.note.content"] = run_description(launch.public_url, launch.job_id)

    def create() -> str:
        # A create whose answer was lost made the run all the same: look before each try.
        found = _find_run(client, experiment_id, launch.job_id)
        return found or str(client.create_run(experiment_id, tags=tags).info.run_id)

    new_id = wait.call("create the run", create)
    spec_data = spec.model_dump(mode="json")
    params = [Param(k, v[:6000]) for k, v in flatten(spec_data).items()]
    for i in range(0, len(params), _MAX_PARAMS):
        chunk = params[i : i + _MAX_PARAMS]
        wait.call("log the params", functools.partial(client.log_batch, new_id, params=chunk))
    wait.call(
        "save config.yaml", lambda: client.log_text(new_id, launch.source_text, "config.yaml")
    )
    return new_id, experiment_id


def _follow_run(client: MlflowClient, launch: LaunchRequest, wait: MlflowWaiter) -> tuple[str, str]:
    """A rank > 0 of a multi-node job: the run rank 0 opened (found by the job-id tag).

    Rank 0 has 300 s to open it, not counting the time MLflow was out of reach.
    """
    if launch.run_id:
        run_id = launch.run_id
        run = wait.call("read the run", lambda: client.get_run(run_id))
        return run.info.run_id, run.info.experiment_id

    def look() -> tuple[str, str] | None:
        experiment = client.get_experiment_by_name(launch.spec.experiment)
        if experiment is None:
            return None
        run_id = _find_run(client, experiment.experiment_id, launch.job_id)
        return None if run_id is None else (run_id, experiment.experiment_id)

    looked_s = 0.0
    while looked_s < 300:
        found = wait.call("look up the job's run", look)
        if found is not None:
            return found
        if wait.stop.wait(0.5):
            raise StopRequested("stop requested while waiting for rank 0's MLflow run")
        looked_s += 0.5
    raise RuntimeError(f"rank 0 of {launch.job_id} opened no MLflow run within 300 s")


def _record_resume(client: MlflowClient, run_id: str, launch: LaunchRequest) -> None:
    """Tag the run with this attempt and why the job came back (preemption, worker lost)."""
    tags = {k: v for k, v in launch.tags.items() if k != "jobworker.queue_wait_s"}
    tags[f"jobworker.resume.{launch.attempt}"] = launch.resume_reason or "resumed"
    if launch.preemptions:
        tags["jobworker.preemptions"] = str(launch.preemptions)
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def _run_program(
    ctx: MlflowJobContext, spec: TrainingSpec, activate: Callable[[], None]
) -> TrainResult | None:
    """The user's entrypoint or the built-in training loop. User code may use MLflow's own
    API (``mlflow.active_run()``, ``mlflow.log_*``): ``activate()`` makes the job's run this
    thread's active run before it starts (its import overlaps the opening). The built-in
    loop reports through ``ctx`` only and starts while the run is still being opened."""
    if spec.entrypoint:
        module_name, _, attr = spec.entrypoint.partition(":")
        fn = getattr(importlib.import_module(module_name), attr)
        activate()
        result = fn(ctx, dict(spec.config))
        return result if isinstance(result, TrainResult) else None
    return train(ctx, spec.train_params())


def _log_model(
    client: MlflowClient,
    wait: MlflowWaiter,
    run_id: str,
    experiment_id: str,
    result: TrainResult,
    register_as: str | None,
    alias: str | None,
    tags: dict[str, str],
) -> str | None:
    """Log the trained model to the run and register it once, its version tagged with
    ``tags``; its version, if registered."""
    model = result.model.to("cpu").eval()
    example = result.example_input.to("cpu")
    with torch.no_grad():
        output = model(example)
    signature = infer_signature(example.numpy(), output.numpy())

    def log() -> str:
        # A try whose answer was lost may have logged the model all the same: take that one.
        logged = client.search_logged_models(
            [experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = 'model'"
        )
        ready = [m.model_id for m in logged if m.status == LoggedModelStatus.READY]
        if ready:
            return str(ready[0])
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            signature=signature,
            input_example=example.numpy(),
            # A torch.export program: replicas load it without unpickling (MLflow's default
            # today, named so that a change of default cannot bring pickles back).
            serialization_format="pt2",
            # Declared, not inferred: inference loads the model in a subprocess (seconds).
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
        return str(info.model_id)

    model_id = wait.call("log the model", log)
    if not register_as:
        return None
    name = register_as

    def register() -> str:
        # One version per run, however often this is tried (or a resumed attempt repeats it).
        mine = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        if mine:
            return str(min(int(v.version) for v in mine))
        return str(mlflow.register_model(f"models:/{model_id}", name, tags=tags).version)

    version = wait.call(f"register the model as {name!r}", register)
    if alias:
        wait.call(
            f"set alias {alias!r}",
            lambda: client.set_registered_model_alias(name, alias, version),
        )
    return version


def peak_gpu_memory_gb() -> float | None:
    """The most GPU memory this process reserved on any one GPU, in GiB (torch's caching
    allocator, ``torch.cuda.max_memory_reserved``; the CUDA context is not in it); None
    without CUDA or when the job never used it."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        return None
    peak = max(torch.cuda.max_memory_reserved(i) for i in range(torch.cuda.device_count()))
    return peak / GIB if peak else None


def end_tags(
    earlier: Mapping[str, str], outcome: str, attempt_s: float, peak_gb: float | None
) -> list[RunTag]:
    """The end-of-run tags, folding in what earlier attempts of the job tagged."""
    duration_s = attempt_s + float(earlier.get(ACTUAL_DURATION_TAG, 0.0))
    tags = [RunTag("jobworker.outcome", outcome), RunTag(ACTUAL_DURATION_TAG, f"{duration_s:.1f}")]
    peaks = [float(earlier[PEAK_GPU_MEMORY_TAG])] if PEAK_GPU_MEMORY_TAG in earlier else []
    if peak_gb is not None:
        peaks.append(peak_gb)
    if peaks:
        tags.append(RunTag(PEAK_GPU_MEMORY_TAG, f"{max(peaks):.3f}"))
    return tags


def _end_run(
    client: MlflowClient,
    wait: MlflowWaiter,
    run_id: str,
    outcome: str,
    status: str,
    attempt_s: float,
) -> None:
    """Tag the run with the job's outcome, run time and peak GPU memory, and end it
    (after a stop request: one try each)."""

    def end() -> None:
        if mlflow.active_run() is None:  # the program failed before this thread started it
            mlflow.start_run(run_id=run_id)
        mlflow.end_run(status=status)  # stops the run's system-metrics monitor, sets its status

    try:
        earlier = wait.call("read the run", lambda: client.get_run(run_id)).data.tags
        tags = end_tags(earlier, outcome, attempt_s, peak_gpu_memory_gb())
        wait.call("tag the run", lambda: client.log_batch(run_id, tags=tags))
        total = next(t.value for t in tags if t.key == ACTUAL_DURATION_TAG)
        print(f"jobworker: ran {attempt_s:.1f} s this attempt, {total} s in all", flush=True)
        wait.call("end the run", end)
    except (StopRequested, MlflowRefused) as exc:
        print(f"jobworker: the run is not ended in MLflow: {exc}", file=sys.stderr, flush=True)


def _spool_max_bytes() -> int:
    return int(os.environ.get("JOBWORKER_SPOOL_MAX_BYTES", DEFAULT_SPOOL_MAX_BYTES))


def _earlier_spools(work_dir: Path) -> list[Path]:
    """Spools that earlier attempts of this job left on this node.

    The executor gives each attempt its own work dir in the job's dir; what
    is in another job's spool (another run) is left alone.
    """
    return [p for p in work_dir.parent.glob(f"*/{SPOOL_DIR}") if p.parent != work_dir]


def _exit_with_parent() -> None:
    """Die with the worker actor: an orphaned job would hold its GPUs unseen."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(70)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _start_run(client: MlflowClient, launch: LaunchRequest, wait: MlflowWaiter) -> tuple[str, str]:
    """Open the job's run (rank 0) or find it (the other ranks); ``(run_id, experiment_id)``.

    Rank 0 also starts MLflow's own system-metrics monitor on it (CPU, memory, and GPU
    through NVML when present), which ``mlflow.end_run`` stops, from any thread.
    """
    if not launch.leader:
        return _follow_run(client, launch, wait)
    run_id, experiment_id = _open_run(client, launch, wait)
    print(f"jobworker: job {launch.job_id} logs to MLflow run {run_id}", flush=True)
    mlflow.set_system_metrics_sampling_interval(2)  # type: ignore[no-untyped-call]
    mlflow.set_system_metrics_samples_before_logging(1)  # type: ignore[no-untyped-call]
    wait.call("start the run", lambda: mlflow.start_run(run_id=run_id, log_system_metrics=True))
    return run_id, experiment_id


def _activate(run_id: str, wait: MlflowWaiter) -> None:
    """Make ``run_id`` this thread's active MLflow run (MLflow keeps one per thread)."""
    if mlflow.active_run() is None:
        wait.call("start the run", lambda: mlflow.start_run(run_id=run_id))


def _open_in_background(
    open_run: Callable[[], tuple[str, str]], stop: threading.Event
) -> Future[tuple[str, str]]:
    """``open_run()`` in a thread; when it fails the job is asked to stop (its error is the
    job's outcome)."""
    future: Future[tuple[str, str]] = Future()

    def run() -> None:
        try:
            future.set_result(open_run())
        except BaseException as exc:
            stop.set()
            future.set_exception(exc)

    threading.Thread(target=run, name="mlflow-open", daemon=True).start()
    return future


def _prewarm() -> None:
    """In a warm process: what a job's first step would otherwise pay for, CUDA excepted.

    An optimizer step on CPU (torch's first one imports much), and MLflow's client and
    store for the pool's tracking URI (a SQLite store checks its schema). No autograd: its
    engine counts the CUDA devices, which would fix them before the job's
    ``CUDA_VISIBLE_DEVICES`` is set.
    """
    layer = torch.nn.Linear(2, 1)
    for param in layer.parameters():
        param.grad = torch.zeros_like(param)
    torch.optim.SGD(layer.parameters(), lr=0.1).step()
    uri = os.environ.get(TRACKING_URI_VAR)
    if uri:
        try:
            MlflowClient(uri)
        except Exception as exc:  # the job's own client says it again, and waits
            print(f"jobworker: warm process could not ready MLflow at {uri}: {exc}", flush=True)


def main(work_dir: Path) -> int:
    started_s = time.monotonic()
    _exit_with_parent()
    launch = LaunchRequest.model_validate_json((work_dir / "launch.json").read_text())
    cap_job_process(launch)  # before the program allocates anything
    spec = launch.spec
    cpus = spec.resources.cpus
    torch.set_num_threads(cpus)
    mlflow.set_tracking_uri(launch.tracking_uri)
    client = MlflowClient(launch.tracking_uri)
    result_path = work_dir / "result.json"
    leader = launch.leader
    wait = MlflowWaiter(launch.tracking_uri, threading.Event())

    def on_sigterm(_signum: int, _frame: FrameType | None) -> None:
        wait.stop.set()  # ctx.request_stop(), also before the run is open

    signal.signal(signal.SIGTERM, on_sigterm)
    outcome: dict[str, Any] = {"run_id": launch.run_id}
    run_id: str | None = None
    ctx: MlflowJobContext | None = None
    status = "FINISHED"
    try:
        # Off the path to the first step: the program starts while the run is opened; its
        # metrics and checkpoints wait for the run (workers.mlflow_context).
        opening = _open_in_background(lambda: _start_run(client, launch, wait), wait.stop)
        ctx = MlflowJobContext(
            client=client,
            run=opening,
            work_dir=work_dir,
            gpu_ids=launch.node.gpu_indices,
            cpus=cpus,
            waiter=wait,
            leader=leader,
            spool_max_bytes=_spool_max_bytes(),
            adopt=_earlier_spools(work_dir) if launch.world_size == 1 else (),
        )
        print(
            f"jobworker: job {launch.job_id} attempt {launch.attempt} "
            f"gpus={list(launch.node.gpu_indices)} cpus={cpus} "
            f"rank {launch.rank} of {launch.world_size}",
            flush=True,
        )

        def activate() -> None:
            if leader:
                _activate(opening.result()[0], wait)

        try:
            result = _run_program(ctx, spec, activate)
        finally:
            # What opening the run raised (refused, stopped) is the job's outcome, over
            # what it made the program raise.
            run_id, experiment_id = opening.result()
            outcome["run_id"] = run_id
        if leader:  # log_model records the model in this thread's active run
            _activate(run_id, wait)
        if result is not None and leader:
            outcome["metrics"] = result.metrics
            outcome["model_version"] = _log_model(
                client,
                wait,
                run_id,
                experiment_id,
                result,
                spec.register_as,
                spec.register_alias,
                version_tags(launch, run_id),
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
        if ctx is not None:
            for err in ctx.close():
                print(f"jobworker: {err}", file=sys.stderr, flush=True)
        if leader and run_id is not None:
            _end_run(
                client,
                wait,
                run_id,
                outcome.get("status", "failed"),
                status,
                time.monotonic() - started_s,
            )
        write_json_atomic(result_path, outcome)
    return 0 if outcome["status"] != "failed" else 1


if __name__ == "__main__":
    if sys.argv[1] == "--warm":  # everything above is imported: wait for a job (warm pool)
        _prewarm()
        handed = wait_for_job()
        sys.exit(0 if handed is None else main(handed))
    sys.exit(main(Path(sys.argv[1])))
