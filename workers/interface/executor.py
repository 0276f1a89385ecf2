"""The executor interface: how the control plane starts, watches and stops job workers.

The scheduler talks to workers only through :class:`Executor` and these
values; ``workers/ray_executor.py`` implements it on Ray. What the scheduler
decided travels typed: an :class:`Assignment` (stored with the job), and per
rank a :class:`LaunchRequest` that carries the user's :class:`TrainingSpec`
itself down to the job process (which re-reads it from ``launch.json``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from workers.interface.spec import TrainingSpec
from workers.interface.telemetry import GpuUuid


class _Value(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeAssignment(_Value):
    """One rank's place: the node, its GPUs (indices only for ``CUDA_VISIBLE_DEVICES``).

    ``pid`` is the rank's job process, once known (placement matches NVML's
    per-process memory to it). ``gpu_memory_bytes`` is what the job holds on each
    of these GPUs when placement decided it (``gpu_memory_gb: auto``); None: the
    spec's number.
    """

    node_id: str
    hostname: str
    gpu_indices: tuple[int, ...] = ()
    gpu_uuids: tuple[GpuUuid, ...] = ()
    pid: int | None = None
    gpu_memory_bytes: int | None = None

    def held_gpu_memory_bytes(self, spec: TrainingSpec) -> int:
        """What the job of ``spec`` holds on each GPU here: the one placement decided, else
        the spec's (0 for an ``auto`` spec placed by a loop that decided none)."""
        if self.gpu_memory_bytes is not None:
            return self.gpu_memory_bytes
        return spec.resources.gpu_memory_bytes or 0


class Assignment(_Value):
    """Where the scheduler put one attempt of a job: one entry per rank, rank 0 first.

    >>> a = Assignment(nodes=(NodeAssignment(node_id="n1", hostname="a", gpu_indices=(0,),
    ...                                      gpu_uuids=(GpuUuid("GPU-0"),)),))
    >>> a.leader.hostname, a.gpus
    ('a', 1)
    """

    nodes: tuple[NodeAssignment, ...] = Field(min_length=1)

    @property
    def leader(self) -> NodeAssignment:
        """Rank 0's node: its address is the gang's rendezvous, it owns the MLflow run."""
        return self.nodes[0]

    @property
    def gpus(self) -> int:
        """GPUs over all ranks."""
        return sum(len(n.gpu_uuids) for n in self.nodes)

    def with_pids(self, pids: Sequence[int | None]) -> Assignment:
        """The assignment with each rank's job process pid (``None`` keeps what is known)."""
        nodes = tuple(
            n if pid is None else n.model_copy(update={"pid": pid})
            for n, pid in zip(self.nodes, [*pids, *[None] * len(self.nodes)], strict=False)
        )
        return self.model_copy(update={"nodes": nodes})


class LaunchRequest(_Value):
    """Everything one rank of one attempt of a job needs, decided by the scheduler.

    The job process reads it back from ``launch.json`` (``model_dump_json`` /
    ``model_validate_json``): one typed value from the loop to the training loop.
    """

    job_id: str
    attempt: int
    rank: int = 0
    world_size: int = 1
    node: NodeAssignment  # this rank's
    spec: TrainingSpec
    source_text: str
    tracking_uri: str
    run_id: str | None = None
    resume_reason: str | None = None  # why an earlier attempt ended (preempted, worker lost)
    preemptions: int = 0
    tags: dict[str, str] = Field(default_factory=dict)
    python_path: tuple[str, ...] = ()
    simulated_usage_dir: str | None = None
    # The node's own state directory (the same path on every node, like the usage dir):
    # what the node agent and the processes it watches share (see workers/node_dir.py).
    node_dir: str | None = None
    serving_cores: int = 1  # the node's first cores serve; training is pinned to the others
    # A multi-node job is a gang: one worker per node, rank 0 on the first node.
    master_node_id: str | None = None  # rank 0's node: the executor resolves its address
    master_addr: str | None = None
    master_port: int | None = None
    # The API's address seen by users: the run's description links to the job's page.
    public_url: str | None = None

    @property
    def leader(self) -> bool:
        return self.rank == 0


class Progress(_Value):
    """What a running job process reports: its MLflow run and its latest step's metrics."""

    run_id: str | None = None
    experiment_id: str | None = None
    step: int | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    first_step_at: float | None = None  # unix seconds of the first logged step


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
    progress: Progress | None = None
    run_id: str | None = None
    model_version: str | None = None
    error: str | None = None
    pid: int | None = None
    rank_pids: tuple[int | None, ...] = ()  # a gang's job process per rank
    # False: a retry would fail the same way (the job went over its GPU memory cap).
    retryable: bool = True


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
        retryable=all(r.retryable for r in reports),
    )


@dataclass(frozen=True)
class WarmPoolStatus:
    """One node's warm pool (``jobworker cluster``): its size, the idle warm job processes
    ready for a job, and their memory (RSS, with the actors that hold them)."""

    node_id: str
    size: int
    idle: int
    idle_rss_bytes: int


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

    def throttle(self, job_id: str, paused: bool) -> None:
        """Throttle every rank of a running job (``paused``: the SLO guard), or release it."""
        ...

    def release(self, job_id: str) -> None:
        """Free the worker of a finished job."""
        ...

    def active(self) -> set[str]:
        """Job ids that have a live worker (for reconciling after a restart)."""
        ...
