"""``jobworker simulate``: replay a job trace through the queue policy and placement.

Registered on the main app by ``scheduler.cli.main`` (``app.command()(simulate)``).
The replay itself is :func:`scheduler.sim.simulator.simulate`; this module reads
the trace, checks the arguments and prints a table, or with ``--json`` one
JSON object on stdout. Bad arguments print ``error: …`` and exit with 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from scheduler.sim.policies import POLICIES
from scheduler.sim.simulator import SimConfig, SimResult
from scheduler.sim.simulator import simulate as replay
from scheduler.sim.traces import TraceError, read_philly

_err = Console(stderr=True, soft_wrap=True)


def _fail(message: str) -> typer.Exit:
    _err.print(f"[red]error:[/] {message}", highlight=False)
    return typer.Exit(2)


def _hours(seconds: float) -> str:
    return f"{seconds:,.0f} s ({seconds / 3600:,.1f} h)"


def _table(result: SimResult, title: str) -> Table:
    table = Table("figure", "value", title=title)
    table.add_row("jobs replayed", f"{len(result.jobs):,}")
    if result.skipped or result.unfinished:
        table.add_row("jobs skipped / unfinished", f"{result.skipped} / {result.unfinished}")
    table.add_row("average JCT", _hours(result.avg_jct_s))
    table.add_row("p99 JCT", _hours(result.p99_jct_s))
    table.add_row("average queueing delay", _hours(result.avg_queue_s))
    table.add_row("makespan", _hours(result.makespan_s))
    table.add_row(
        "GPU utilization (held / useful)", f"{result.gpu_util:.1%} / {result.useful_util:.1%}"
    )
    table.add_row("preemptions", f"{result.preemptions:,}")
    table.add_row("GPU time lost to preemption", _hours(result.lost_gpu_s))
    table.add_row("replay wall time", f"{result.replay_s:.2f} s ({result.plan_calls:,} passes)")
    return table


def simulate(
    trace: Annotated[Path, typer.Argument(help="Job trace: the Philly CSV (see shared/traces).")],
    cluster: Annotated[
        str | None, typer.Option("--cluster", help="Only this virtual cluster's jobs.")
    ] = None,
    jobs: Annotated[
        int | None, typer.Option("--jobs", help="The first N jobs by submit time.", min=1)
    ] = None,
    gpus: Annotated[int, typer.Option("--gpus", help="GPUs in the simulated cluster.")] = 48,
    gpus_per_node: Annotated[int, typer.Option("--gpus-per-node", help="GPUs per node.")] = 8,
    policy: Annotated[
        str, typer.Option("--policy", help="fifo, fifo-backfill, sjf, srpt, ours or predictive.")
    ] = "ours",
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the figures as one JSON object.")
    ] = False,
    checkpoint_every_s: Annotated[
        float,
        typer.Option("--checkpoint-every-s", help="Checkpoint interval; 0: continuous."),
    ] = 600.0,
    restart_s: Annotated[
        float, typer.Option("--restart-s", help="Cost of resuming a preempted job.")
    ] = 30.0,
    max_job_gpus: Annotated[
        int, typer.Option("--max-job-gpus", help="Leave out jobs with more GPUs.")
    ] = 16,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the GPU-memory rule.")] = 0,
) -> None:
    """Replay a job trace on a simulated cluster with the real queue policy and placement."""
    if policy not in POLICIES:
        raise _fail(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if gpus < 1 or gpus_per_node < 1:
        raise _fail("--gpus and --gpus-per-node must be at least 1")
    if checkpoint_every_s < 0 or restart_s < 0:
        raise _fail("--checkpoint-every-s and --restart-s must not be negative")
    try:
        jobs_read = read_philly(trace, cluster=cluster, jobs=jobs, max_gpus=max_job_gpus, seed=seed)
    except OSError as exc:
        raise _fail(f"cannot read {trace}: {exc.strerror or exc}") from exc
    except TraceError as exc:
        raise _fail(f"{trace}: {exc}") from exc
    if not jobs_read:
        raise _fail(f"{trace}: no jobs left after the filters")
    config = SimConfig(gpus, gpus_per_node, checkpoint_every_s, restart_s)
    result = replay(jobs_read, policy, config)
    if json_out:
        figures = {
            "trace": str(trace),
            "cluster": cluster,
            "gpus": gpus,
            "gpus_per_node": gpus_per_node,
            "checkpoint_every_s": checkpoint_every_s,
            "restart_s": restart_s,
            "seed": seed,
            **result.figures(),
        }
        typer.echo(json.dumps(figures))
        return
    where = f"cluster {cluster}" if cluster else "all clusters"
    title = f"{policy}: {len(jobs_read):,} jobs of {where} on {gpus} GPUs ({gpus_per_node}/node)"
    Console().print(_table(result, title))
