"""The executor interface: how the control plane starts, watches and stops job workers.

The scheduler talks to workers only through :class:`Executor` and these
values; ``workers/ray_executor.py`` implements it on Ray.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol


@dataclass(frozen=True)
class LaunchRequest:
    """Everything a worker needs to run one attempt of one job, decided by the scheduler."""

    job_id: str
    attempt: int
    node_id: str
    gpu_indices: tuple[int, ...]
    gpu_uuids: tuple[str, ...]
    gpu_memory_bytes: int
    cpus: int
    spec: dict[str, Any]
    source_text: str
    tracking_uri: str
    train_params: dict[str, Any] | None = None  # ``jobs.train.TrainParams`` fields (built-ins)
    run_id: str | None = None
    resume_reason: str | None = None  # why an earlier attempt ended (preempted, worker lost)
    preemptions: int = 0
    tags: dict[str, str] = field(default_factory=dict)
    python_path: tuple[str, ...] = ()
    simulated_usage_dir: str | None = None
    # A multi-node job is a gang: one worker per node, rank 0 on the first node.
    rank: int = 0
    world_size: int = 1
    master_node_id: str | None = None  # rank 0's node: its address is MASTER_ADDR
    master_port: int | None = None


class WorkerPhase(StrEnum):
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"  # stopped on request (cancel or preemption)
    LOST = "LOST"  # the worker disappeared: infrastructure failure

    @property
    def finished(self) -> bool:
        return self not in (WorkerPhase.STARTING, WorkerPhase.RUNNING)


@dataclass(frozen=True)
class WorkerReport:
    """What one poll learned about a job's worker."""

    job_id: str
    phase: WorkerPhase
    logs: str = ""  # output since the previous poll
    progress: dict[str, Any] | None = None  # {"step": int, "metrics": {...}}
    run_id: str | None = None
    model_version: str | None = None
    error: str | None = None
    pid: int | None = None
    rank_pids: tuple[int | None, ...] = ()  # a gang's job process per rank


def combine_ranks(job_id: str, reports: Sequence[WorkerReport]) -> WorkerReport:
    """One report for a gang from its ranks' reports (rank 0 first).

    The gang is lost or failed as soon as one rank is (the loop then stops the
    others); it succeeded when every rank did, and it runs once all ranks run.
    Progress, run id and model version are rank 0's; other ranks' output is
    prefixed with their rank.

    >>> r = combine_ranks("j", [WorkerReport("j", WorkerPhase.RUNNING, pid=7)])
    >>> r.phase, r.rank_pids
    (<WorkerPhase.RUNNING: 'RUNNING'>, (7,))
    """
    leader = reports[0]
    logs = leader.logs + "".join(
        "".join(f"[rank {k}] {line}\n" for line in r.logs.splitlines())
        for k, r in enumerate(reports[1:], start=1)
    )
    phases = [r.phase for r in reports]
    phase = leader.phase
    error = leader.error
    for bad in (WorkerPhase.LOST, WorkerPhase.FAILED):
        culprit = next((k for k, r in enumerate(reports) if r.phase is bad), None)
        if culprit is not None:
            phase = bad
            error = f"rank {culprit}: {reports[culprit].error}" if len(reports) > 1 else error
            break
    else:
        if all(p is WorkerPhase.SUCCEEDED for p in phases):
            phase = WorkerPhase.SUCCEEDED
        elif all(p.finished for p in phases) and WorkerPhase.STOPPED in phases:
            phase = WorkerPhase.STOPPED
        elif any(p is WorkerPhase.STARTING for p in phases) or (
            leader.phase.finished and not all(p.finished for p in phases)
        ):
            phase = WorkerPhase.RUNNING if leader.phase.finished else WorkerPhase.STARTING
        else:
            phase = WorkerPhase.RUNNING
    return WorkerReport(
        job_id,
        phase,
        logs=logs,
        progress=leader.progress,
        run_id=leader.run_id,
        model_version=leader.model_version,
        error=error,
        pid=leader.pid,
        rank_pids=tuple(r.pid for r in reports),
    )


class Executor(Protocol):
    def launch(self, request: LaunchRequest) -> None:
        """Start the job's worker on ``request.node_id``; returns without waiting for it."""
        ...

    def poll(
        self, job_ids: Sequence[str], world_sizes: Mapping[str, int] | None = None
    ) -> dict[str, WorkerReport]:
        """Report on each job's workers (``world_sizes[job]`` ranks, default 1), combined.

        A job with no worker at all reports ``LOST``.
        """
        ...

    def stop(self, job_id: str, grace_s: float) -> None:
        """Ask the job to stop (checkpoint and exit); kill it after ``grace_s``."""
        ...

    def release(self, job_id: str) -> None:
        """Free the worker of a finished job."""
        ...

    def active(self) -> set[str]:
        """Job ids that have a live worker (for reconciling after a restart)."""
        ...
