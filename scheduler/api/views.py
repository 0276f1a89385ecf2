"""The HTTP representations of jobs, deployments, the queue and the cluster (pydantic)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict
from typing import Any

from pydantic import BaseModel

from scheduler.batch.predictions import JobPrediction
from scheduler.batch.store import JobEvent, JobRecord
from scheduler.core.model import Holding
from scheduler.realtime.store import DeploymentRecord
from workers.interface.executor import Assignment, Progress, WarmPoolStatus
from workers.interface.telemetry import NodeReading


class EventOut(BaseModel):
    at: float
    from_state: str | None
    to_state: str
    reason: str


class JobPredictionOut(BaseModel):
    """When a pending or running job is predicted to start and end (None: no estimate).

    ``start_at``: a pending job's predicted start, a running job's current attempt's
    start; ``duration_s`` its predicted run time in all, ``remaining_s`` what is left
    of it; ``spread_s`` the duration's ``±``; ``basis`` the family the estimate comes
    from (``name:…``, ``work:…``, ``team:…``, ``cluster``), ``samples`` how many
    finished runs of it (0: no estimate yet).
    """

    start_at: float | None
    end_at: float | None
    duration_s: float | None
    remaining_s: float | None
    spread_s: float | None
    basis: str | None
    samples: int


class JobOut(BaseModel):
    id: str
    name: str
    spec: dict[str, Any]
    experiment: str
    team: str
    priority: int
    state: str
    submitted_at: float
    started_at: float | None
    finished_at: float | None
    attempts: int
    preemptions: int  # attempts ended to make room for other work
    losses: int  # attempts lost with their worker, node, Ray or the control plane
    failures: int  # attempts whose own process failed (retried up to max_retries)
    assignment: Assignment | None
    run_id: str | None
    run_url: str | None
    model_version: str | None
    error: str | None
    progress: Progress | None
    pending_reasons: list[str] | None
    cancel_requested: bool
    history: list[EventOut] | None = None
    prediction: JobPredictionOut | None = None  # pending and running jobs, once forecast


class FieldError(BaseModel):
    """One problem: ``loc`` a config's dotted field path (``resources.gpus``), or for a
    malformed query parameter FastAPI's path to it (``["query", "queue_anyway"]``)."""

    loc: str | list[str | int]
    msg: str


class ConfigRejected(BaseModel):
    detail: list[FieldError]


class Refusal(BaseModel):
    """Why a request was refused: a 4xx or 503 other than a config's 422."""

    detail: str


NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": Refusal}}  # routes naming one thing


class ValidationOk(BaseModel):
    valid: bool
    name: str
    spec: dict[str, Any]


class LogsOut(BaseModel):
    text: str
    next_offset: int


def run_url(ui_url: str | None, job: JobRecord) -> str | None:
    """The MLflow UI page of the job's run, when both are known."""
    experiment_id = job.progress.experiment_id if job.progress else None
    if not (ui_url and job.run_id and experiment_id):
        return None
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{job.run_id}"


def job_out(
    job: JobRecord,
    ui_url: str | None,
    history: list[JobEvent] | None = None,
    prediction: JobPrediction | None = None,
) -> JobOut:
    return JobOut(
        id=job.id,
        name=job.name,
        spec=job.spec.model_dump(mode="json"),
        experiment=job.experiment,
        team=job.team,
        priority=job.priority,
        state=job.state.value,
        submitted_at=job.submitted_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        attempts=job.attempts,
        preemptions=job.preemptions,
        losses=job.losses,
        failures=job.failures,
        assignment=job.assignment,
        run_id=job.run_id,
        run_url=run_url(ui_url, job),
        model_version=job.model_version,
        error=job.error,
        progress=job.progress,
        pending_reasons=list(job.pending_reasons) if job.pending_reasons is not None else None,
        cancel_requested=job.cancel_requested,
        history=(
            [
                EventOut(
                    at=e.at,
                    from_state=e.from_state.value if e.from_state else None,
                    to_state=e.to_state.value,
                    reason=e.reason,
                )
                for e in history
            ]
            if history is not None
            else None
        ),
        prediction=(
            JobPredictionOut.model_validate(asdict(prediction))
            if prediction is not None and not job.terminal
            else None
        ),
    )


class ReplicaOut(BaseModel):
    id: str
    phase: str
    routed: bool
    retiring: bool
    node: str
    gpu_indices: list[int]
    gpu_memory_bytes: int | None = None  # held on each of its GPUs
    model_version: str | None
    model_uri: str
    error: str | None


class DeploymentOut(BaseModel):
    name: str
    state: str
    message: str | None
    model: str
    model_version: str | None
    run_id: str | None
    predict_path: str
    replicas: list[ReplicaOut]
    spec: dict[str, Any]
    created_at: float
    updated_at: float


def deployment_out(record: DeploymentRecord, replicas: list[dict[str, Any]]) -> DeploymentOut:
    return DeploymentOut(
        name=record.name,
        state=record.state.value,
        message=record.message,
        model=record.spec.model,
        model_version=record.model_version,
        run_id=record.run_id,
        predict_path=f"/v1/models/{record.name}/predict",
        replicas=[ReplicaOut(**r) for r in replicas],
        spec=record.spec.model_dump(mode="json"),
        created_at=record.created_at,
        updated_at=record.updated_at,
    )


class PredictionOut(BaseModel):
    """A prediction; a non-finite output (NaN, ±infinity) is ``null``."""

    outputs: list[Any]
    model: str
    version: str | None
    run_id: str | None


class QueueEntryOut(BaseModel):
    position: int
    job_id: str
    name: str
    team: str
    priority: int
    submitted_at: float
    reasons: list[str]
    predicted_start_at: float | None = None
    predicted_end_at: float | None = None
    predicted_duration_s: float | None = None
    predicted_spread_s: float | None = None
    prediction_basis: str | None = None


def cluster_table(
    nodes: Sequence[NodeReading],
    active: Iterable[JobRecord],
    replicas: Iterable[tuple[str, Holding]] = (),
    pools: Iterable[WarmPoolStatus] = (),
) -> dict[str, Any]:
    """``GET /cluster``: every node's telemetry, each GPU with what holds a share of it.

    A GPU entry keeps ``jobs`` (the ``active`` jobs' ids on it) and gains ``replicas``
    (the deployments whose replicas hold a share of it, from ``replicas``: (deployment,
    holding) pairs) and ``holders``: one ``{"kind", "id", "memory_bytes"}`` per job
    (``"job"``, its per-GPU memory), per replica (``"replica"``, the deployment's name,
    its holding) and, when the GPU uses more than these, ``"outside"`` (id None) with
    the rest. The node entry's ``jobs`` lists the jobs on any of its GPUs, and ``pool``
    its warm pool from ``pools`` (``{"size", "idle", "idle_rss_bytes"}``; None: no pool
    status for the node).
    """
    pool_of = {p.node_id: p for p in pools}
    holders: dict[str, list[dict[str, Any]]] = {}
    on_node: dict[str, list[str]] = {}
    for job in active:
        for placed in job.assignment.nodes if job.assignment else ():
            on_node.setdefault(placed.node_id, []).append(job.id)
            held = placed.held_gpu_memory_bytes(job.spec)
            for uuid in placed.gpu_uuids:
                holders.setdefault(uuid, []).append(
                    {"kind": "job", "id": job.id, "memory_bytes": held}
                )
    for deployment, holding in replicas:
        for uuid in holding.gpu_uuids:
            holders.setdefault(uuid, []).append(
                {"kind": "replica", "id": deployment, "memory_bytes": holding.gpu_memory_bytes}
            )
    out = []
    for node in nodes:
        entry = asdict(node)
        entry["jobs"] = on_node.get(node.node_id, [])
        pool = pool_of.get(node.node_id)
        entry["pool"] = (
            None
            if pool is None
            else {
                "size": pool.size,
                "idle": pool.idle,
                "idle_rss_bytes": pool.idle_rss_bytes,
            }
        )
        for gpu in entry["gpus"]:
            known = holders.get(gpu["uuid"], [])
            gpu["jobs"] = [h["id"] for h in known if h["kind"] == "job"]
            gpu["replicas"] = sorted({h["id"] for h in known if h["kind"] == "replica"})
            gpu["holders"] = known + _outside(gpu["memory_used_bytes"], known)
        out.append(entry)
    return {"nodes": out}


def _outside(used_bytes: int | None, known: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The share of a GPU's used memory no job or replica accounts for (none if none)."""
    if used_bytes is None:
        return []
    rest = used_bytes - sum(h["memory_bytes"] or 0 for h in known)
    return [{"kind": "outside", "id": None, "memory_bytes": rest}] if rest > 0 else []
