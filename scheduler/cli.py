"""The ``jobworker`` command line. Server commands start things; the rest call the API."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from scheduler import cli_serving
from scheduler.cli_common import (
    TERMINAL,
    ApiOpt,
    HomeOpt,
    err,
    guard,
    out,
    read_text,
    state_text,
    when,
)
from scheduler.cli_simulate import simulate
from scheduler.client import ApiUnreachable, Client
from scheduler.errors import ConfigError
from scheduler.spec import load_spec

app = typer.Typer(
    help="jobworker: a GPU-aware scheduler for ML training and inference.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


# -- servers ------------------------------------------------------------------------------
@app.command()
def up(
    home: HomeOpt = Path(".jobworker"),
    host: Annotated[str, typer.Option(envvar="JOBWORKER_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="JOBWORKER_PORT")] = 8000,
    tracking_uri: Annotated[
        str | None,
        typer.Option(envvar="MLFLOW_TRACKING_URI", help="Use this MLflow; else start one."),
    ] = None,
    mlflow_port: Annotated[int, typer.Option(envvar="JOBWORKER_MLFLOW_PORT")] = 5000,
    ray_address: Annotated[
        str | None, typer.Option(envvar="JOBWORKER_RAY_ADDRESS", help="Join this Ray cluster.")
    ] = None,
    db_url: Annotated[
        str | None, typer.Option(envvar="JOBWORKER_DB_URL", help="Job store URL (PostgreSQL).")
    ] = None,
    cluster_config: Annotated[
        Path | None, typer.Option(envvar="JOBWORKER_CLUSTER_CONFIG", help="Simulated GPUs.")
    ] = None,
    gpu_backend: Annotated[str, typer.Option(envvar="JOBWORKER_GPU_BACKEND")] = "auto",
    queue_config: Annotated[
        Path | None,
        typer.Option(envvar="JOBWORKER_QUEUE_CONFIG", help="Queue rules: quotas, fair share."),
    ] = None,
    detach: Annotated[bool, typer.Option(help="Run in the background; see `down`.")] = False,
) -> None:
    """Start the API (and local Ray and an MLflow server unless addresses are given)."""
    home.mkdir(parents=True, exist_ok=True)
    if detach:
        _detach(home, host, port)
        return
    from scheduler.mlflow_server import start_mlflow_server, wait_until_up
    from scheduler.wiring import Settings

    mlflow_proc = None
    if tracking_uri is None:
        tracking_uri = f"http://127.0.0.1:{mlflow_port}"
        out.print(f"starting MLflow server on {tracking_uri} …")
        mlflow_proc = start_mlflow_server(home, "127.0.0.1", mlflow_port)
    try:
        if mlflow_proc is not None:
            wait_until_up(f"{tracking_uri}/health", 120, mlflow_proc)
        settings = Settings(
            home=home,
            db_url=db_url,
            tracking_uri=tracking_uri,
            ray_address=ray_address,
            cluster_config=cluster_config,
            gpu_backend=gpu_backend,
            queue_config=queue_config,
        )
        _serve(settings, host, port)
    finally:
        if mlflow_proc is not None:
            mlflow_proc.terminate()
            mlflow_proc.wait(timeout=30)


def _serve(settings: Any, host: str, port: int) -> None:
    import uvicorn

    from scheduler.wiring import build

    plane = build(settings)
    plane.start()
    out.print(f"jobworker API on http://{host}:{port}  (MLflow UI: {settings.ui_url})")
    try:
        uvicorn.run(plane.app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        plane.stop()


def _detach(home: Path, host: str, port: int) -> None:
    from scheduler.mlflow_server import wait_until_up

    args = [a for a in sys.argv[1:] if a != "--detach"]
    log = (home / "jobworker.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "scheduler.cli", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    (home / "jobworker.pid").write_text(str(proc.pid))
    with out.status("starting jobworker (Ray, MLflow server, API) …"):
        try:
            wait_until_up(f"http://{host}:{port}/healthz", 180, proc)
        except RuntimeError as exc:
            err.print(f"[red]error:[/] {exc}; see {home / 'jobworker.log'}")
            raise typer.Exit(1) from exc
    out.print(
        f"jobworker is up: API http://{host}:{port} (pid {proc.pid}); stop it with `jobworker down`"
    )


@app.command()
def down(home: HomeOpt = Path(".jobworker")) -> None:
    """Stop a jobworker started with `up --detach`."""
    pid_file = home / "jobworker.pid"
    if not pid_file.exists():
        err.print(f"[yellow]nothing to stop:[/] no {pid_file}")
        raise typer.Exit(1)
    pid = int(pid_file.read_text())
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.3)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    pid_file.unlink()
    out.print("jobworker stopped")


@app.command()
def demo(
    config: Path = Path("configs/train/mlp_synthetic.yaml"),
    deployment: Path = Path("configs/serve/mlp_synthetic.yaml"),
    home: HomeOpt = Path(".jobworker"),
    api: ApiOpt = "http://127.0.0.1:8000",
    mlflow_port: Annotated[int, typer.Option(envvar="JOBWORKER_MLFLOW_PORT")] = 5000,
) -> None:
    """Start everything in the background, train the example, serve it, print where to look."""
    client = Client(api)
    try:
        client.healthz()
        out.print(f"jobworker already up at {api}")
    except ApiUnreachable:
        port = urlsplit(api).port or 8000
        started = subprocess.run(
            [
                *(sys.executable, "-m", "scheduler.cli", "up", "--detach", "--home", str(home)),
                *("--port", str(port), "--mlflow-port", str(mlflow_port)),
            ],
            check=False,
        )
        if started.returncode != 0:
            raise typer.Exit(started.returncode) from None
    job = guard(lambda: client.submit(read_text(config)))
    out.print(f"submitted [bold]{job['id']}[/] from {config}")
    final = _wait(client, job["id"])
    if final["state"] != "SUCCEEDED":
        raise typer.Exit(1)
    dep = guard(lambda: client.deploy(read_text(deployment)))
    out.print(f"\ndeploying [bold]{dep['name']}[/] ({dep['model']}) from {deployment}")
    served = cli_serving.wait_ready(client, dep["name"], timeout_s=300)
    if served["state"] != "READY":
        raise typer.Exit(1)
    example = [[round(0.01 * i, 2) for i in range(64)]]
    answer = guard(lambda: client.predict(dep["name"], example))
    out.print(
        f"POST {api}{served['predict_path']} → class scores {answer['outputs'][0][:3]}… "
        f"from {answer['model']} version {answer['version']}"
    )
    out.print(
        f"\nMLflow UI: [bold]http://127.0.0.1:{mlflow_port}[/]  (stop everything: `make stop`)"
    )


# -- jobs ---------------------------------------------------------------------------------
@app.command()
def validate(file: Path) -> None:
    """Check a training config without submitting it."""
    try:
        spec = load_spec(read_text(file))
    except ConfigError as exc:
        err.print(f"[red]invalid:[/] {file}")
        for loc, msg in exc.errors:
            err.print(f"  [bold]{loc or '(config)'}[/]: {msg}")
        raise typer.Exit(2) from exc
    out.print(f"[green]valid:[/] {file} (job {spec.name!r}, experiment {spec.experiment!r})")


@app.command()
def submit(
    file: Path,
    wait: Annotated[bool, typer.Option(help="Show progress until the job ends.")] = False,
    api: ApiOpt = "http://127.0.0.1:8000",
) -> None:
    """Submit a training config (YAML or JSON)."""
    client = Client(api)
    job = guard(lambda: client.submit(read_text(file)))
    out.print(f"submitted [bold]{job['id']}[/] ({job['name']})")
    if wait:
        final = _wait(client, job["id"])
        raise typer.Exit(0 if final["state"] == "SUCCEEDED" else 1)


def _wait(client: Client, job_id: str) -> dict[str, Any]:
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=out,
    ) as progress:
        job = guard(lambda: client.get(job_id))
        train = job.get("spec", {})
        task = progress.add_task(job_id, total=None, detail="")
        while True:
            job = guard(lambda: client.get(job_id))
            p = job.get("progress") or {}
            metrics = p.get("metrics") or {}
            loss = f" loss {metrics['loss']:.4f}" if "loss" in metrics else ""
            step = f"step {p['step']}" if p.get("step") is not None else ""
            progress.update(
                task,
                description=f"{job_id} {state_text(job['state'])}",
                detail=f"{step}{loss}",
                total=p.get("max_steps") or train.get("max_steps"),
                completed=p.get("step") or 0,
            )
            if job["state"] in TERMINAL:
                break
            time.sleep(0.5)
    _print_job(job)
    return job


def _print_job(job: dict[str, Any]) -> None:
    out.print(f"[bold]{job['id']}[/] {job['name']}: {state_text(job['state'])}")
    if job.get("error"):
        out.print(f"  error: [red]{job['error']}[/]")
    if job.get("assignment"):
        a = job["assignment"]
        out.print(f"  node: {a.get('hostname')}  GPUs: {a.get('gpu_indices') or 'none'}")
    if job.get("run_id"):
        out.print(f"  MLflow run: {job.get('run_url') or job['run_id']}")
    if job.get("model_version"):
        out.print(f"  registered model version: {job['model_version']}")
    for reason in job.get("pending_reasons") or []:
        out.print(f"  waiting: {reason}")


@app.command()
def status(
    job_id: Annotated[str | None, typer.Argument()] = None,
    state: Annotated[list[str] | None, typer.Option(help="Only jobs in these states.")] = None,
    api: ApiOpt = "http://127.0.0.1:8000",
) -> None:
    """One job with its history, or a table of jobs."""
    client = Client(api)
    if job_id:
        job = guard(lambda: client.get(job_id))
        _print_job(job)
        table = Table("at", "from", "to", "reason", title="history")
        for e in job.get("history") or []:
            table.add_row(
                when(e["at"]), e["from_state"] or "", state_text(e["to_state"]), e["reason"]
            )
        out.print(table)
        return
    jobs = guard(lambda: client.jobs([s.upper() for s in state or []]))
    table = Table("id", "name", "state", "step", "loss", "node", "submitted")
    for j in jobs:
        p = j.get("progress") or {}
        loss = (p.get("metrics") or {}).get("loss")
        table.add_row(
            j["id"],
            j["name"],
            state_text(j["state"]),
            str(p.get("step") or ""),
            f"{loss:.4f}" if loss is not None else "",
            (j.get("assignment") or {}).get("hostname", ""),
            when(j["submitted_at"]),
        )
    out.print(table)


@app.command()
def logs(
    job_id: str,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Stream until the job ends.")
    ] = False,
    api: ApiOpt = "http://127.0.0.1:8000",
) -> None:
    """Print a job's output."""
    client = Client(api)
    if follow:
        guard(lambda: _stream(client, job_id))
        return
    text, _ = guard(lambda: client.logs(job_id))
    sys.stdout.write(text)


def _stream(client: Client, job_id: str) -> None:
    for chunk in client.follow_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


@app.command()
def cancel(job_id: str, api: ApiOpt = "http://127.0.0.1:8000") -> None:
    """Cancel a pending or running job."""
    client = Client(api)
    job = guard(lambda: client.cancel(job_id))
    if job["state"] in TERMINAL:
        out.print(f"{job_id} already finished: {state_text(job['state'])}")
    else:
        out.print(f"cancelling {job_id} (was {state_text(job['state'])})")


@app.command()
def queue(api: ApiOpt = "http://127.0.0.1:8000") -> None:
    """Pending jobs in the order the scheduler will consider them, and why each waits."""
    entries = guard(Client(api).queue)
    table = Table("#", "job", "name", "team", "priority", "submitted", "waiting because")
    for e in entries:
        table.add_row(
            str(e["position"]),
            e["job_id"],
            e["name"],
            e["team"],
            str(e["priority"]),
            when(e["submitted_at"]),
            "\n".join(e["reasons"]),
        )
    out.print(table if entries else "no pending jobs")


@app.command()
def cluster(api: ApiOpt = "http://127.0.0.1:8000") -> None:
    """Nodes and GPUs: type, memory, utilization, and the jobs on each."""
    client = Client(api)
    view = guard(client.cluster)
    table = Table("node", "GPU", "type", "used GiB", "free GiB", "util %", "jobs")
    gib = 2**30
    for node in view["nodes"]:
        if not node["gpus"]:
            table.add_row(node["hostname"], "-", "-", "-", "-", "-", ", ".join(node["jobs"]))
        for g in node["gpus"]:
            used = g["memory_used_bytes"]
            free = g["memory_free_bytes"]
            util = g["util_pct"]
            table.add_row(
                node["hostname"],
                str(g["index"]) + ("" if g["available"] else " (unavailable)"),
                g["name"] or "?",
                f"{used / gib:.1f}" if used is not None else "?",
                f"{free / gib:.1f}" if free is not None else "?",
                f"{util:.0f}" if util is not None else "?",
                ", ".join(g["jobs"]),
            )
    out.print(table)


# -- the real-time lane -------------------------------------------------------------------
app.command()(cli_serving.deploy)
app.command()(cli_serving.deployments)
app.command()(cli_serving.undeploy)
app.command()(cli_serving.predict)

# -- the trace-driven simulator -----------------------------------------------------------
app.command()(simulate)

if __name__ == "__main__":
    app()
