"""A job record in the core's terms: what it asks of the cluster, what it holds, how it queues.

The live loop builds the queue policy's and placement's inputs here, from what
the job store keeps: the same inputs the simulator builds from its own state
(``scheduler.sim.simulator``), so the policy sees a live job as it saw a
simulated one. Pure.

A job with ``resources.gpu_memory_gb: auto`` asks for what
:func:`auto_gpu_memory_of` sizes from its prediction; the loop hands that
same value to :func:`demand_of` (what placement requires) and to
:func:`assignment_of` (what the job then holds, stored with the assignment so
that a later prediction never changes what a running job holds).
"""

from __future__ import annotations

from scheduler.batch.store import JobRecord
from scheduler.core.gpu_memory import AutoGpuMemory, auto_gpu_memory
from scheduler.core.model import (
    Decision,
    Demand,
    Holding,
    NodePlacement,
    QueuedJob,
    RunningJob,
)
from scheduler.core.predictor import Prediction
from scheduler.core.states import JobState
from workers.interface.executor import Assignment, NodeAssignment
from workers.interface.spec import TrainingSpec
from workers.interface.telemetry import NodeReading


def auto_gpu_memory_of(job: JobRecord, prediction: Prediction | None) -> AutoGpuMemory | None:
    """What a ``gpu_memory_gb: auto`` job asks for, given its prediction; None for a job
    that wrote a number (never changed)."""
    if not job.spec.resources.gpu_memory_auto:
        return None
    return auto_gpu_memory(prediction)


def demand_of(job: JobRecord, auto: AutoGpuMemory | None = None) -> Demand:
    """What ``job`` asks of one pass of placement.

    ``auto`` is :func:`auto_gpu_memory_of` for an ``auto`` job (without it, such a
    job asks for the whole GPU); it is ignored for a job that wrote a number.
    """
    return spec_demand(job.id, job.spec, auto)


def spec_demand(job_id: str, spec: TrainingSpec, auto: AutoGpuMemory | None = None) -> Demand:
    """What a job of ``spec`` asks of placement (see :func:`demand_of`); a job to be
    submitted too."""
    res = spec.resources
    gpu_memory_bytes = res.gpu_memory_bytes
    if gpu_memory_bytes is None:
        gpu_memory_bytes = (auto or auto_gpu_memory(None)).gpu_memory_bytes
    return Demand(
        job_id=job_id,
        gpus=res.gpus,
        gpu_memory_bytes=gpu_memory_bytes,
        cpus=res.cpus,
        memory_bytes=res.memory_bytes,
        gpu_type=res.gpu_type,
        nodes=res.nodes,
    )


def queued_job(
    job: JobRecord, remaining_s: float | None = None, est_error: float | None = None
) -> QueuedJob:
    """A PENDING job: its service so far, when it (re)entered the queue, its predicted
    run time left (``remaining_s``; None: unknown) and how far off its family's past
    predictions were (``est_error``; None: unknown)."""
    res = job.spec.resources
    return QueuedJob(
        job_id=job.id,
        team=job.team,
        priority=job.priority,
        gpus=res.gpus,
        submitted_at=job.submitted_at,
        nodes=res.nodes,
        attained_gpu_s=job.attained_gpu_s,
        queued_at=job.queued_at,
        est_duration_s=remaining_s,
        est_error=est_error,
    )


def running_job(
    job: JobRecord, est_end: float | None = None, est_error: float | None = None
) -> RunningJob | None:
    """A SCHEDULED or RUNNING job holding GPUs, since the start of its current attempt,
    predicted to end at ``est_end`` (None: unknown; ``est_error`` as for :func:`queued_job`).

    None for a job that holds no GPU (the queue policy counts GPUs only).
    """
    a = job.assignment
    if a is None or not a.gpus:
        return None
    return RunningJob(
        job_id=job.id,
        team=job.team,
        priority=job.priority,
        gpus=len(a.leader.gpu_uuids),
        node_ids=tuple(n.node_id for n in a.nodes),
        started_at=running_since(job),
        attained_gpu_s=job.attained_gpu_s,
        preemptible=job.preempt_reason is None,
        est_end=est_end,
        est_error=est_error,
    )


def running_since(job: JobRecord) -> float:
    """When a SCHEDULED or RUNNING job's current attempt started (SCHEDULED: was placed)."""
    if job.state is JobState.RUNNING and job.attempt_started_at is not None:
        return job.attempt_started_at
    return job.updated_at


def holdings_of(job: JobRecord) -> list[Holding]:
    """What a scheduled or running job holds: one holding per node of its gang."""
    if job.assignment is None:
        return []
    res = job.spec.resources
    return [
        Holding(
            job_id=job.id,
            node_id=n.node_id,
            gpu_uuids=n.gpu_uuids,
            gpu_memory_bytes=n.held_gpu_memory_bytes(job.spec),
            cpus=res.cpus,
            memory_bytes=res.memory_bytes,
            pid=n.pid,
        )
        for n in job.assignment.nodes
    ]


def assignment_of(
    decision: Decision, nodes: dict[str, NodeReading], auto: AutoGpuMemory | None = None
) -> Assignment:
    """A placed decision as the job's assignment: one entry per node, in rank order.

    For an ``auto`` job (``auto`` given) each entry records what the job holds on
    each GPU: the sized request, or for the whole GPU the least free memory among
    the chosen GPUs of that node as telemetry last read it.
    """
    return Assignment(
        nodes=tuple(
            NodeAssignment(
                node_id=p.node_id,
                hostname=nodes[p.node_id].hostname,
                gpu_indices=p.gpu_indices,
                gpu_uuids=p.gpu_uuids,
                gpu_memory_bytes=None if auto is None else _held_bytes(auto, p, nodes),
            )
            for p in decision.placement
        )
    )


def _held_bytes(auto: AutoGpuMemory, placed: NodePlacement, nodes: dict[str, NodeReading]) -> int:
    if auto.gpu_memory_gb is not None:
        return auto.gpu_memory_bytes
    chosen = set(placed.gpu_uuids)
    free = [g.memory_free_bytes or 0 for g in nodes[placed.node_id].gpus if g.uuid in chosen]
    return min(free, default=0)
