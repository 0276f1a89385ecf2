"""Commands of the batch lane: validate, submit, status, logs, cancel, queue, cluster."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from scheduler.api.client import Client
from scheduler.cli.cluster_view import holder_names
from scheduler.cli.common import (
    TERMINAL,
    ApiOpt,
    HomeOpt,
    JsonOpt,
    TokenOpt,
    connect,
    err,
    guard,
    out,
    print_json,
    read_text,
    state_text,
    when,
)
from scheduler.cli.estimates import NO_ESTIMATE, estimate_text, run_text, start_text
from workers.interface.errors import ConfigError
from workers.interface.spec import load_spec
from workers.interface.telemetry import GIB


def validate(file: Path, as_json: JsonOpt = False) -> None:
    """Check a training config without submitting it."""
    try:
        spec = load_spec(read_text(file), [os.getcwd()])  # where `up` runs jobs from
    except ConfigError as exc:
        if as_json:
            errors = [{"loc": loc, "msg": msg} for loc, msg in exc.errors]
            print_json({"valid": False, "errors": errors})
            raise typer.Exit(2) from exc
        err.print(f"[red]invalid:[/] {file}")
        for loc, msg in exc.errors:
            err.print(f"  [bold]{loc or '(config)'}[/]: {msg}")
        raise typer.Exit(2) from exc
    if as_json:  # the shape of the API's POST /jobs/validate answer
        print_json({"valid": True, "name": spec.name, "spec": spec.model_dump(mode="json")})
        return
    out.print(f"[green]valid:[/] {file} (job {spec.name!r}, experiment {spec.experiment!r})")


def submit(
    file: Path,
    wait: Annotated[bool, typer.Option(help="Show progress until the job ends.")] = False,
    queue_anyway: Annotated[
        bool,
        typer.Option(help="Queue it even if no node of the cluster could hold it (nodes to join)."),
    ] = False,
    api: ApiOpt = "http://127.0.0.1:8000",
    token: TokenOpt = None,
    home: HomeOpt = Path(".jobworker"),
) -> None:
    """Submit a training config (YAML or JSON)."""
    client = connect(api, token, home)
    job = guard(lambda: client.submit(read_text(file), queue_anyway))
    out.print(f"submitted [bold]{job['id']}[/] ({job['name']})")
    if wait:
        final = wait_for_job(client, job["id"])
        raise typer.Exit(0 if final["state"] == "SUCCEEDED" else 1)


def wait_for_job(client: Client, job_id: str) -> dict[str, Any]:
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=out,
    ) as progress:
        job = guard(lambda: client.get(job_id))
        max_steps = job["spec"]["train"].get("max_steps")
        task = progress.add_task(job_id, total=max_steps, detail="")
        while True:
            job = guard(lambda: client.get(job_id))
            p = job.get("progress") or {}
            metrics = p.get("metrics") or {}
            loss = f" loss {metrics['loss']:.4f}" if "loss" in metrics else ""
            step = f"step {p['step']}" if p.get("step") is not None else ""
            waiting = (job.get("pending_reasons") or [""])[0] if job["state"] == "PENDING" else ""
            progress.update(
                task,
                description=f"{job_id} {state_text(job['state'])}",
                detail=f"{step}{loss}{waiting}",
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
    for rank, node in enumerate((job.get("assignment") or {}).get("nodes", [])):
        gpus = ",".join(map(str, node["gpu_indices"])) or "none"
        out.print(f"  rank {rank}: node {node['hostname']}  GPUs {gpus}")
    if job.get("run_id"):
        out.print(f"  MLflow run: {job.get('run_url') or job['run_id']}")
    if job.get("model_version"):
        out.print(f"  registered model version: {job['model_version']}")
    for reason in job.get("pending_reasons") or []:
        out.print(f"  waiting: {reason}")
    if job["state"] not in TERMINAL:
        out.print(f"  estimate: {estimate_text(job.get('prediction'), time.time())}")


def status(
    job_id: Annotated[str | None, typer.Argument()] = None,
    state: Annotated[list[str] | None, typer.Option(help="Only jobs in these states.")] = None,
    as_json: JsonOpt = False,
    api: ApiOpt = "http://127.0.0.1:8000",
    token: TokenOpt = None,
    home: HomeOpt = Path(".jobworker"),
) -> None:
    """One job with its history, or a table of jobs."""
    client = connect(api, token, home)
    if job_id:
        job = guard(lambda: client.get(job_id))
        if as_json:
            print_json(job)
            return
        _print_job(job)
        table = Table("at", "from", "to", "reason", title="history")
        for e in job.get("history") or []:
            table.add_row(
                when(e["at"]), e["from_state"] or "", state_text(e["to_state"]), e["reason"]
            )
        out.print(table)
        return
    jobs = guard(lambda: client.jobs([s.upper() for s in state or []]))
    if as_json:
        print_json(jobs)
        return
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
            ",".join(n["hostname"] for n in (j.get("assignment") or {}).get("nodes", [])),
            when(j["submitted_at"]),
        )
    out.print(table)


def logs(
    job_id: str,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Stream until the job ends.")
    ] = False,
    offset: Annotated[int, typer.Option(help="Start at this byte of the output.")] = 0,
    as_json: JsonOpt = False,
    api: ApiOpt = "http://127.0.0.1:8000",
    token: TokenOpt = None,
    home: HomeOpt = Path(".jobworker"),
) -> None:
    """Print a job's output; ``--json``: ``{text, next_offset}``, to resume from ``--offset``."""
    if follow and as_json:
        err.print("[red]error:[/] --json prints what is there now; it does not mix with --follow")
        raise typer.Exit(2)
    client = connect(api, token, home)
    if follow:
        guard(lambda: _stream(client, job_id, offset))
        return
    text, next_offset = guard(lambda: client.logs(job_id, offset))
    if as_json:
        print_json({"text": text, "next_offset": next_offset})
        return
    sys.stdout.write(text)


def _stream(client: Client, job_id: str, offset: int) -> None:
    for chunk in client.follow_logs(job_id, offset):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def cancel(
    job_id: str,
    api: ApiOpt = "http://127.0.0.1:8000",
    token: TokenOpt = None,
    home: HomeOpt = Path(".jobworker"),
) -> None:
    """Cancel a pending or running job."""
    client = connect(api, token, home)
    job = guard(lambda: client.cancel(job_id))
    if job["state"] in TERMINAL:
        out.print(f"{job_id} already finished: {state_text(job['state'])}")
    else:
        out.print(f"cancelling {job_id} (was {state_text(job['state'])})")


def queue(
    as_json: JsonOpt = False,
    api: ApiOpt = "http://127.0.0.1:8000",
    token: TokenOpt = None,
    home: HomeOpt = Path(".jobworker"),
) -> None:
    """Pending jobs in the order the scheduler will consider them, and why each waits."""
    entries = guard(connect(api, token, home).queue)
    if as_json:
        print_json(entries)
        return
    now = time.time()
    table = Table(
        "#", "job", "name", "team", "priority", "submitted", "predicted", "waiting because"
    )
    for e in entries:
        table.add_row(
            str(e["position"]),
            e["job_id"],
            e["name"],
            e["team"],
            str(e["priority"]),
            when(e["submitted_at"]),
            _predicted(e, now),
            "\n".join(e["reasons"]),
        )
    out.print(table if entries else "no pending jobs")


def _predicted(entry: dict[str, Any], now: float) -> str:
    """A queue entry's predicted start and run time, or why there is none."""
    if entry.get("predicted_start_at") is None:
        return NO_ESTIMATE
    text = start_text(entry["predicted_start_at"], now)
    if entry.get("predicted_duration_s") is None:
        return f"{text}; its own run time unknown (no finished runs of this family)"
    return f"{text}, {run_text(entry['predicted_duration_s'], entry.get('predicted_spread_s'))}"


def pool_text(pool: dict[str, Any] | None) -> str:
    """A node's warm pool in ``jobworker cluster``: ``1/1 idle, 0.41 GiB`` (``-``: none known).

    >>> pool_text({"size": 2, "idle": 1, "idle_rss_bytes": 2**29})
    '1/2 idle, 0.50 GiB'
    """
    if pool is None:
        return "-"
    if not pool["size"] and not pool["idle"]:
        return "off"
    return f"{pool['idle']}/{pool['size']} idle, {pool['idle_rss_bytes'] / GIB:.2f} GiB"


def cluster(
    as_json: JsonOpt = False,
    api: ApiOpt = "http://127.0.0.1:8000",
    token: TokenOpt = None,
    home: HomeOpt = Path(".jobworker"),
) -> None:
    """Nodes and GPUs: type, memory, utilization, the jobs and replicas on each, and each
    node's warm pool (idle warm job processes of its size, and their memory)."""
    client = connect(api, token, home)
    view = guard(client.cluster)
    if as_json:
        print_json(view)
        return
    table = Table("node", "GPU", "type", "used GiB", "free GiB", "util %", "jobs", "warm pool")
    for node in view["nodes"]:
        pool = pool_text(node.get("pool"))
        if not node["gpus"]:
            table.add_row(node["hostname"], "-", "-", "-", "-", "-", ", ".join(node["jobs"]), pool)
        for i, g in enumerate(node["gpus"]):
            used = g["memory_used_bytes"]
            free = g["memory_free_bytes"]
            util = g["util_pct"]
            table.add_row(
                node["hostname"],
                str(g["index"]) + ("" if g["available"] else " (unavailable)"),
                g["name"] or "?",
                f"{used / GIB:.1f}" if used is not None else "?",
                f"{free / GIB:.1f}" if free is not None else "?",
                f"{util:.0f}" if util is not None else "?",
                ", ".join(holder_names(g)),
                pool if i == 0 else "",
            )
    out.print(table)
