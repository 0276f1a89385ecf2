"""Commands of the real-time lane: deploy, deployments, undeploy, rollback, predict."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from scheduler.api.client import Client
from scheduler.cli.common import (
    ApiOpt,
    HomeOpt,
    TokenOpt,
    connect,
    err,
    guard,
    out,
    read_text,
    state_text,
    when,
)


def deploy(
    file: Path,
    wait: Annotated[bool, typer.Option(help="Show progress until it serves or fails.")] = True,
    timeout_s: Annotated[float, typer.Option("--timeout", help="Seconds to wait.")] = 300,
    api: ApiOpt = "http://127.0.0.1:8000",
    token: TokenOpt = None,
    home: HomeOpt = Path(".jobworker"),
) -> None:
    """Deploy a model (configs/serve/*.yaml), or update the deployment of that name."""
    client = connect(api, token, home)
    dep = guard(lambda: client.deploy(read_text(file)))
    out.print(f"deploying [bold]{dep['name']}[/] ({dep['model']}) from {file}")
    if wait:
        final = wait_ready(client, dep["name"], timeout_s)
        raise typer.Exit(0 if final["state"] == "READY" else 1)


def wait_ready(
    client: Client, name: str, timeout_s: float, version: str | None = None
) -> dict[str, Any]:
    """Show the deployment's progress until READY (serving ``version``, when given) or
    FAILED (or the timeout)."""
    deadline = time.monotonic() + timeout_s
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=out
    ) as progress:
        task = progress.add_task(name)
        while True:
            dep = guard(lambda: client.deployment(name))
            ready = sum(1 for r in dep["replicas"] if r["routed"])
            detail = f"{name}: {dep['state']}, {ready}/{len(dep['replicas'])} replicas serving"
            progress.update(
                task, description=detail + (f" — {dep['message']}" if dep["message"] else "")
            )
            serving = version is None or dep["model_version"] == version
            ready = dep["state"] == "READY" and serving
            if ready or dep["state"] == "FAILED" or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    _print_deployment(dep)
    if dep["state"] not in ("READY", "FAILED"):
        err.print(f"[yellow]still {dep['state']} after {timeout_s:g} s[/]")
    elif dep["state"] == "READY" and version is not None and dep["model_version"] != version:
        err.print(f"[yellow]still serving version {dep['model_version']} after {timeout_s:g} s[/]")
    return dep


def deployments(
    name: Annotated[str | None, typer.Argument(help="Show one deployment in detail.")] = None,
    api: ApiOpt = "http://127.0.0.1:8000",
    token: TokenOpt = None,
    home: HomeOpt = Path(".jobworker"),
) -> None:
    """List deployments, or show one with its replicas."""
    client = connect(api, token, home)
    if name:
        _print_deployment(guard(lambda: client.deployment(name)))
        return
    table = Table("name", "state", "model", "version", "replicas", "updated", "message")
    for dep in guard(client.deployments):
        routed = sum(1 for r in dep["replicas"] if r["routed"])
        table.add_row(
            dep["name"],
            state_text(dep["state"]),
            dep["model"],
            dep["model_version"] or "-",
            f"{routed}/{len(dep['replicas'])}",
            when(dep["updated_at"]),
            dep["message"] or "",
        )
    out.print(table)


def _print_deployment(dep: dict[str, Any]) -> None:
    out.print(
        f"[bold]{dep['name']}[/] {state_text(dep['state'])}  model {dep['model']} "
        f"(version {dep['model_version'] or '-'}, run {dep['run_id'] or '-'})"
    )
    if dep["message"]:
        out.print(f"  {dep['message']}")
    out.print(f"  predict: POST {dep['predict_path']}")
    table = Table("replica", "phase", "serving", "node", "GPUs", "version", "error")
    for r in dep["replicas"]:
        table.add_row(
            r["id"],
            r["phase"] + (" (retiring)" if r["retiring"] else ""),
            "yes" if r["routed"] else "no",
            r["node"],
            ",".join(map(str, r["gpu_indices"])) or "-",
            r["model_version"] or "-",
            r["error"] or "",
        )
    out.print(table)


def undeploy(
    name: str,
    api: ApiOpt = "http://127.0.0.1:8000",
    token: TokenOpt = None,
    home: HomeOpt = Path(".jobworker"),
) -> None:
    """Stop serving a deployment and free its replicas."""
    guard(lambda: connect(api, token, home).undeploy(name))
    out.print(f"undeployed [bold]{name}[/]")


def rollback(
    name: str,
    wait: Annotated[
        bool, typer.Option(help="Show progress until it serves the earlier version.")
    ] = True,
    timeout_s: Annotated[float, typer.Option("--timeout", help="Seconds to wait.")] = 300,
    api: ApiOpt = "http://127.0.0.1:8000",
    token: TokenOpt = None,
    home: HomeOpt = Path(".jobworker"),
) -> None:
    """Serve the model version a deployment served before its current one (pinned)."""
    client = connect(api, token, home)
    dep = guard(lambda: client.rollback(name))
    out.print(f"rolling [bold]{name}[/] back to {dep['model']}")
    if wait:
        version = dep["model"].rsplit("/", 1)[-1]
        final = wait_ready(client, name, timeout_s, version)
        raise typer.Exit(
            0 if final["state"] == "READY" and final["model_version"] == version else 1
        )


def predict(
    name: str,
    input_file: Annotated[
        Path | None,
        typer.Option("--input", help='JSON file: {"inputs": [[...]]} or a list of rows.'),
    ] = None,
    data: Annotated[str | None, typer.Option(help="The rows as JSON text instead.")] = None,
    api: ApiOpt = "http://127.0.0.1:8000",
    token: TokenOpt = None,
    home: HomeOpt = Path(".jobworker"),
) -> None:
    """Send rows to a deployed model and print its outputs."""
    if (input_file is None) == (data is None):
        err.print("[red]error:[/] give exactly one of --input FILE or --data JSON")
        raise typer.Exit(2)
    text = read_text(input_file) if input_file else str(data)
    try:
        payload = json.loads(text)
    except ValueError as exc:
        err.print(f"[red]error:[/] {input_file or '--data'} is not JSON: {exc}")
        raise typer.Exit(2) from exc
    inputs = payload["inputs"] if isinstance(payload, dict) and "inputs" in payload else payload
    result = guard(lambda: connect(api, token, home).predict(name, inputs))
    out.print_json(data=result["outputs"])
    out.print(f"model {result['model']} version {result['version']} (run {result['run_id']})")
