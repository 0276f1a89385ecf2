"""Commands that start and stop things: ``up``, ``down``, ``demo``.

``up`` runs the control plane in this process (or, with ``--detach``, in a
background one); the other commands of the CLI only call its API.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import httpx
import typer
from rich.markup import escape

from scheduler.api.client import ApiUnreachable, Client
from scheduler.api.guards import MIB
from scheduler.batch.queue_config import DEFAULT_MODE
from scheduler.cli import daemons, serving
from scheduler.cli.common import ApiOpt, HomeOpt, TokenOpt, connect, err, guard, out, read_text
from scheduler.cli.jobs import wait_for_job
from scheduler.core.model import MODES
from scheduler.core.slo_guard import GuardSettings
from workers.interface.errors import ServiceError


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
        str | None,
        typer.Option(envvar="JOBWORKER_RAY_ADDRESS", help="Join this Ray cluster; else start one."),
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
    queue_mode: Annotated[
        str | None,
        typer.Option(
            envvar="JOBWORKER_QUEUE_MODE",
            help=f"Queue order, over the queue config's: {' | '.join(MODES)} "
            f"(default {DEFAULT_MODE}).",
        ),
    ] = None,
    allowed_hosts: Annotated[
        str,
        typer.Option(
            envvar="JOBWORKER_ALLOWED_HOSTS",
            help="Host names served besides --host, comma-separated (DNS rebinding guard).",
        ),
    ] = "",
    max_body_bytes: Annotated[int, typer.Option(envvar="JOBWORKER_MAX_BODY_BYTES")] = 8 * MIB,
    max_config_bytes: Annotated[
        int,
        typer.Option(envvar="JOBWORKER_MAX_CONFIG_BYTES", help="Body limit of non-predict routes."),
    ] = MIB,
    metrics_public: Annotated[
        bool,
        typer.Option(envvar="JOBWORKER_METRICS_PUBLIC", help="Serve /metrics without a token."),
    ] = False,
    public_url: Annotated[
        str | None,
        typer.Option(
            envvar="JOBWORKER_PUBLIC_URL",
            help="The API's address for users (MLflow runs link there); default http://HOST:PORT.",
        ),
    ] = None,
    memory_caps: Annotated[
        bool,
        typer.Option(
            envvar="JOBWORKER_MEMORY_CAPS",
            help="Node agents stop a process that uses more GPU memory than it asked for.",
        ),
    ] = True,
    memory_cap_grace_s: Annotated[
        float,
        typer.Option(
            envvar="JOBWORKER_MEMORY_CAP_GRACE_S",
            help="How long a process may stay over its GPU memory cap before it is stopped.",
        ),
    ] = 4.0,  # Settings.memory_cap_grace_s
    serving_cores: Annotated[
        int,
        typer.Option(
            min=0,
            envvar="JOBWORKER_SERVING_CORES",
            help="Each node's first cores serve (this API, replicas); training is pinned to the "
            "others.",
        ),
    ] = 1,
    slo_guard: Annotated[
        bool,
        typer.Option(
            envvar="JOBWORKER_SLO_GUARD",
            help="Throttle training co-located with a deployment whose p99 nears its slo.p99_ms.",
        ),
    ] = True,
    guard_throttle_at: Annotated[
        float,
        typer.Option(
            envvar="JOBWORKER_GUARD_THROTTLE_AT", help="Throttle above this x slo.p99_ms."
        ),
    ] = 0.8,
    guard_release_at: Annotated[
        float,
        typer.Option(envvar="JOBWORKER_GUARD_RELEASE_AT", help="Release below this x slo.p99_ms."),
    ] = 0.5,
    guard_dwell_s: Annotated[
        float,
        typer.Option(
            envvar="JOBWORKER_GUARD_DWELL_S", help="How long p99 must stay over (under) first."
        ),
    ] = 2.0,
    guard_max_throttle_s: Annotated[
        float,
        typer.Option(envvar="JOBWORKER_GUARD_MAX_THROTTLE_S", help="The longest one throttle."),
    ] = 300.0,
    guard_rest_s: Annotated[
        float,
        typer.Option(
            envvar="JOBWORKER_GUARD_REST_S",
            help="After the longest throttle, training runs this long before the next.",
        ),
    ] = 60.0,
    warm_pool: Annotated[
        int,
        typer.Option(
            envvar="JOBWORKER_WARM_POOL",
            min=0,
            help="Warm job processes kept per node (torch and MLflow imported; 0: cold starts).",
        ),
    ] = 1,
    detach: Annotated[bool, typer.Option(help="Run in the background; see `down`.")] = False,
) -> None:
    """Start the API, with a local Ray and an MLflow server unless addresses are given.

    Ray and the MLflow server run as daemons that outlive this process: a
    restarted `up` re-uses them, and the jobs on Ray keep running meanwhile.
    `jobworker down` stops everything. The first `up` on a home writes an admin
    token to <home>/admin.token (mode 0600), which the CLI on this machine uses.
    """
    home.mkdir(parents=True, exist_ok=True, mode=0o700)  # its user's: tokens, logins, dbs
    mode = next((m for m in MODES if m == queue_mode), None)
    if queue_mode is not None and mode is None:
        err.print(f"[red]error:[/] --queue-mode {queue_mode!r}: expected one of {', '.join(MODES)}")
        raise typer.Exit(2)
    try:
        GuardSettings(
            guard_throttle_at, guard_release_at, guard_dwell_s, guard_max_throttle_s, guard_rest_s
        )
    except ValueError as exc:
        err.print(f"[red]error:[/] --guard-* options: {exc}")
        raise typer.Exit(2) from exc
    try:
        if detach:
            _detach(home, host, port)
            return
        lock = daemons.lock_home(home)
        daemons.check_port_free(host, port, "jobworker API")
        if tracking_uri is None:
            mlflow, reused = daemons.mlflow_server(home, mlflow_port)
            out.print(f"{'re-using' if reused else 'started'} MLflow server: {mlflow.describe()}")
            out.print(f"MLflow UI login: {_mlflow_login(home)}")
            tracking_uri = mlflow.address
            # This process, and the Ray head started below (its workers inherit it), log in
            # with it; with --tracking-uri, the operator's own MLFLOW_TRACKING_* are passed on.
            os.environ.update(daemons.mlflow_credentials(home))
        if ray_address is None:
            ray, reused = daemons.ray_head(home)
            out.print(f"{'re-using' if reused else 'started'} local Ray: {ray.describe()}")
            ray_address = ray.address
            os.environ.update(daemons.ray_auth(home))
    except ServiceError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from exc
    from scheduler.wiring import Settings

    settings = Settings(
        home=home,
        db_url=db_url,
        tracking_uri=tracking_uri,
        ray_address=ray_address,
        cluster_config=cluster_config,
        gpu_backend=gpu_backend,
        queue_config=queue_config,
        queue_mode=mode,
        api_host=host,
        api_port=port,
        public_url=public_url,
        allowed_hosts=tuple(h for h in allowed_hosts.split(",") if h.strip()),
        max_body_bytes=max_body_bytes,
        max_config_bytes=max_config_bytes,
        metrics_public=metrics_public,
        memory_cap_grace_s=memory_cap_grace_s if memory_caps else None,
        serving_cores=serving_cores,
        slo_guard=slo_guard,
        guard_throttle_at=guard_throttle_at,
        guard_release_at=guard_release_at,
        guard_dwell_s=guard_dwell_s,
        guard_max_throttle_s=guard_max_throttle_s,
        guard_rest_s=guard_rest_s,
        warm_pool=warm_pool,
    )
    daemons.this_process(home, host, port)
    try:
        _serve(settings, host, port)
    finally:
        daemons.forget_this_process(home)
        lock.close()


def _mlflow_login(home: Path) -> str:
    """How to log in to the home's MLflow UI, without the password (``up``'s output goes to a
    log file when detached): the user name and the file that holds the password."""
    user = daemons.mlflow_credentials(home)["MLFLOW_TRACKING_USERNAME"]
    return f"user {user}, password in {daemons.mlflow_auth_config(home)} (admin_password)"


def _serve(settings: Any, host: str, port: int) -> None:
    import uvicorn

    from scheduler.wiring import build, pin_to_serving_cores

    cores = pin_to_serving_cores(settings)  # first: the threads build() starts inherit it
    out.print(f"API pinned to serving cores {', '.join(map(str, cores))}")
    plane = build(settings)
    plane.start()
    out.print(f"jobworker API on http://{host}:{port}  (MLflow UI: {settings.ui_url})")
    out.print(f"admin token in {settings.admin_token_file} (the CLI here uses it)")
    try:
        uvicorn.run(plane.app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        plane.stop()


def _detach(home: Path, host: str, port: int) -> None:
    """Start `up` in the background; succeed only once that very process serves the API."""
    daemons.lock_home(home).close()  # raises, naming the running instance, if one holds it
    daemons.check_port_free(host, port, "jobworker API")
    args = [a for a in sys.argv[1:] if a != "--detach"]
    log_path = home / "jobworker.log"
    offset = log_path.stat().st_size if log_path.exists() else 0
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "scheduler.cli", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def serving() -> bool:
        if proc.poll() is not None:
            with log_path.open("rb") as fh:
                fh.seek(offset)
                said = fh.read().decode(errors="replace").strip()
            raise ServiceError(f"jobworker up exited with code {proc.returncode}:\n{said[-2000:]}")
        api = daemons.record(home, daemons.API)
        if api is None or api.pid != proc.pid:
            return False
        try:
            return httpx.get(f"http://{host}:{port}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    with out.status("starting jobworker (Ray, MLflow server, API) …") as shown:
        started = time.monotonic()
        while not serving():
            waited_s = time.monotonic() - started
            if waited_s > 300:
                raise ServiceError(
                    f"jobworker up (pid {proc.pid}) did not answer within 300 s; see {log_path}"
                )
            shown.update(f"starting jobworker … {waited_s:.0f} s; {_last_line(log_path, offset)}")
            time.sleep(0.3)
    out.print(
        f"jobworker is up: API http://{host}:{port} (pid {proc.pid}); stop it with `jobworker down`"
    )


def _last_line(log_path: Path, offset: int) -> str:
    """What the starting ``up`` said last (from ``offset`` of its log), for the spinner."""
    with log_path.open("rb") as fh:
        fh.seek(offset)
        lines = fh.read().decode(errors="replace").strip().splitlines()
    return escape(lines[-1][:100]) if lines else "(nothing logged yet)"


def down(home: HomeOpt = Path(".jobworker")) -> None:
    """Stop what `up` started on this home: the API, then local Ray and the MLflow server."""
    stopped = [
        d
        for name, grace_s in ((daemons.API, 60.0), (daemons.RAY, 5.0), (daemons.MLFLOW, 20.0))
        if (d := daemons.stop(home, name, grace_s)) is not None
    ]
    if not stopped:
        err.print(f"[yellow]nothing to stop:[/] nothing of {home} is running")
        raise typer.Exit(1)
    for daemon in stopped:
        out.print(f"stopped {daemon.describe()}")
    out.print("jobworker stopped")


def demo(
    config: Path = Path("configs/train/mlp_synthetic.yaml"),
    deployment: Path = Path("configs/serve/mlp_synthetic.yaml"),
    home: HomeOpt = Path(".jobworker"),
    api: ApiOpt = "http://127.0.0.1:8000",
    mlflow_port: Annotated[int, typer.Option(envvar="JOBWORKER_MLFLOW_PORT")] = 5000,
    token: TokenOpt = None,
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
    client = connect(api, token, home)  # `up` has written its admin token by now
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
    out.print(f"\nConsole: [bold]{api.rstrip('/')}/ui[/]  (a login link: `jobworker ui`)")
    out.print(f"MLflow UI: [bold]http://127.0.0.1:{mlflow_port}[/]  (stop everything: `make stop`)")
    if (home / daemons.MLFLOW_AUTH).exists():  # the MLflow server is this home's: its login
        login = daemons.mlflow_credentials(home)
        out.print(  # on the terminal of the user who started it, who can read the file anyway
            f"  log in as [bold]{login['MLFLOW_TRACKING_USERNAME']}[/] with password "
            f"[bold]{login['MLFLOW_TRACKING_PASSWORD']}[/] (kept in {home / daemons.MLFLOW_AUTH})"
        )
