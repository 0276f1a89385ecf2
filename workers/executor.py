"""The executor interface: how the control plane starts, watches and stops job workers.

The scheduler talks to workers only through :class:`Executor` and these
values; ``workers/ray_executor.py`` implements it on Ray.
"""

from __future__ import annotations

from collections.abc import Sequence
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


class Executor(Protocol):
    def launch(self, request: LaunchRequest) -> None:
        """Start the job's worker on ``request.node_id``; returns without waiting for it."""
        ...

    def poll(self, job_ids: Sequence[str]) -> dict[str, WorkerReport]:
        """Report on each job's worker; a job with no worker at all reports ``LOST``."""
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
