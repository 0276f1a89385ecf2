"""Commands that start and stop things: ``up``, ``down``, ``demo``.

``up`` runs the control plane in this process (or, with ``--detach``, in a
background one); the other commands of the CLI only call its API.
"""

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

from scheduler.api.client import ApiUnreachable, Client
from scheduler.cli import serving
from scheduler.cli.common import ApiOpt, HomeOpt, err, guard, out, read_text
from scheduler.cli.jobs import wait_for_job


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
    from scheduler.cli.mlflow_server import start_mlflow_server, wait_until_up
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
    from scheduler.cli.mlflow_server import wait_until_up

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
    final = wait_for_job(client, job["id"])
    if final["state"] != "SUCCEEDED":
        raise typer.Exit(1)
    dep = guard(lambda: client.deploy(read_text(deployment)))
    out.print(f"\ndeploying [bold]{dep['name']}[/] ({dep['model']}) from {deployment}")
    served = serving.wait_ready(client, dep["name"], timeout_s=300)
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
