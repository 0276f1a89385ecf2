"""What a job record asks of the cluster and holds: the inputs of placement and queue policy."""

from __future__ import annotations

from typing import Any

from scheduler.placement import Demand, Holding
from scheduler.queue_policy import QueuedJob, RunningJob
from scheduler.store import JobRecord

GIB = 2**30


def demand_of(job: JobRecord) -> Demand:
    res = job.spec["resources"]
    return Demand(
        job_id=job.id,
        gpus=res["gpus"],
        gpu_memory_bytes=int(res["gpu_memory_gb"] * GIB),
        cpus=res["cpus"],
        memory_bytes=int(res["memory_gb"] * GIB),
        gpu_type=res.get("gpu_type"),
        nodes=res.get("nodes", 1),
    )


def queued_job(job: JobRecord) -> QueuedJob:
    res = job.spec["resources"]
    return QueuedJob(
        job_id=job.id,
        team=job.team,
        priority=job.priority,
        gpus=res["gpus"],
        submitted_at=job.submitted_at,
        nodes=res.get("nodes", 1),
    )


def assigned_nodes(assignment: dict[str, Any]) -> list[dict[str, Any]]:
    """Per node (rank order): node id, hostname, GPU indices and UUIDs, job process pid."""
    nodes = assignment.get("nodes")
    if nodes:
        return list(nodes)
    keys = ("node_id", "hostname", "gpu_indices", "gpu_uuids", "pid")
    return [{k: assignment.get(k) for k in keys}]


def running_job(job: JobRecord) -> RunningJob | None:
    a = job.assignment
    if not a or not a["gpu_uuids"]:
        return None
    nodes = assigned_nodes(a)
    return RunningJob(
        job_id=job.id,
        team=job.team,
        priority=job.priority,
        gpus=len(a["gpu_uuids"]),
        node_ids=tuple(n["node_id"] for n in nodes),
        started_at=job.started_at or job.updated_at,
        preemptible=not a.get("preempt_reason"),
    )


def holdings_of(job: JobRecord) -> list[Holding]:
    """What a scheduled or running job holds: one holding per node of its gang."""
    a = job.assignment
    if not a:
        return []
    res = job.spec["resources"]
    return [
        Holding(
            job_id=job.id,
            node_id=n["node_id"],
            gpu_uuids=tuple(n["gpu_uuids"]),
            gpu_memory_bytes=int(res["gpu_memory_gb"] * GIB),
            cpus=res["cpus"],
            memory_bytes=int(res["memory_gb"] * GIB),
            pid=n.get("pid"),
        )
        for n in assigned_nodes(a)
    ]
