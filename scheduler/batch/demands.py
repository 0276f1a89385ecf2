"""A job record in the core's terms: what it asks of the cluster, what it holds, how it queues.

The live loop builds the queue policy's and placement's inputs here, from what
the job store keeps: the same inputs the simulator builds from its own state
(``scheduler.sim.simulator``), so the policy sees a live job as it saw a
simulated one. Pure.
"""

from __future__ import annotations

from scheduler.batch.store import JobRecord
from scheduler.core.model import Decision, Demand, Holding, QueuedJob, RunningJob
from scheduler.core.states import JobState
from workers.interface.executor import Assignment, NodeAssignment
from workers.interface.telemetry import NodeReading


def demand_of(job: JobRecord) -> Demand:
    res = job.spec.resources
    return Demand(
        job_id=job.id,
        gpus=res.gpus,
        gpu_memory_bytes=res.gpu_memory_bytes,
        cpus=res.cpus,
        memory_bytes=res.memory_bytes,
        gpu_type=res.gpu_type,
        nodes=res.nodes,
    )


def queued_job(job: JobRecord, remaining_s: float | None = None) -> QueuedJob:
    """A PENDING job: its service so far, when it (re)entered the queue, and its predicted
    run time left (``remaining_s``; None: unknown)."""
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
    )


def running_job(job: JobRecord, est_end: float | None = None) -> RunningJob | None:
    """A SCHEDULED or RUNNING job holding GPUs, since the start of its current attempt,
    predicted to end at ``est_end`` (None: unknown).

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
            gpu_memory_bytes=res.gpu_memory_bytes,
            cpus=res.cpus,
            memory_bytes=res.memory_bytes,
            pid=n.pid,
        )
        for n in job.assignment.nodes
    ]


def assignment_of(decision: Decision, nodes: dict[str, NodeReading]) -> Assignment:
    """A placed decision as the job's assignment: one entry per node, in rank order."""
    return Assignment(
        nodes=tuple(
            NodeAssignment(
                node_id=p.node_id,
                hostname=nodes[p.node_id].hostname,
                gpu_indices=p.gpu_indices,
                gpu_uuids=p.gpu_uuids,
            )
            for p in decision.placement
        )
    )
