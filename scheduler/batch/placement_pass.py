"""The pure part of the loop's placement pass: its inputs from the store's records, then
the queue policy's plan and placement.

The loop (``scheduler.batch.loop``) reads the store, the telemetry and the
history, then calls :func:`snapshot_of` and :func:`plan_pass`; ``bench/placement.py``
times the same two calls on a large synthetic cluster, so the figure it reports
is what a live pass costs, not placement alone. No I/O, no clock: a problem with
one job (a record that cannot be converted) goes to the caller's ``problem``
callback and the pass goes on without that job.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass

from scheduler.batch.demands import demand_of, holdings_of, queued_job, running_job
from scheduler.batch.store import JobRecord
from scheduler.core.gpu_memory import AutoGpuMemory
from scheduler.core.model import (
    ClusterSnapshot,
    Decision,
    Demand,
    Holding,
    PlacementPolicy,
    QueuedJob,
    QueuePlan,
    QueuePolicy,
    RunningJob,
)
from scheduler.core.placement import node_labels
from scheduler.core.predictor import Prediction
from scheduler.core.queue_policy import place_plan, plan
from workers.interface.telemetry import NodeReading

Problem = Callable[[str, str, Exception], None]
"""Told (job id, what could not be done, the exception) about a job left out of the pass."""


@dataclass(frozen=True, slots=True)
class Estimate:
    """A job's prediction, and its run time left after what it has run so far."""

    prediction: Prediction
    remaining_s: float


def snapshot_of(
    nodes: tuple[NodeReading, ...],
    active: Iterable[JobRecord],
    realtime: tuple[Holding, ...],
    problem: Problem,
) -> ClusterSnapshot:
    """Telemetry plus every holding: the active jobs' and the real-time replicas'."""
    holdings: list[Holding] = []
    for job in active:
        try:
            holdings.extend(holdings_of(job))
        except Exception as exc:
            problem(job.id, "cannot count what it holds", exc)
    return ClusterSnapshot(nodes=nodes, holdings=(*holdings, *realtime))


def queued_of(job: JobRecord, est: Estimate | None) -> QueuedJob:
    """A PENDING job as the queue policy takes it, with its estimate if it has one."""
    if est is None:
        return queued_job(job)
    return queued_job(job, est.remaining_s, est.prediction.error)


class PendingInputs:
    """Each pending job's Demand and QueuedJob, kept from one pass to the next.

    Almost no pending job changes between two passes, so the loop builds these
    once per job and again only when what they derive from changes. The key is
    that: for the demand, the ``auto`` GPU memory asked; for the queued job, the
    record's ``queued_at`` and ``attained_gpu_s`` (which the store changes on a
    transition) and the estimate's run time left and error. What the store
    never changes after submission (spec, team, priority) is keyed by the job
    id with its ``submitted_at``, which a record of another submission cannot
    share. :meth:`keep` forgets the jobs no longer pending.
    """

    def __init__(self) -> None:
        self._demands: dict[str, tuple[tuple[object, ...], Demand]] = {}
        self._queued: dict[str, tuple[tuple[object, ...], QueuedJob]] = {}

    def demand(self, job: JobRecord, auto: AutoGpuMemory | None) -> Demand:
        """:func:`~scheduler.batch.demands.demand_of` ``(job, auto)``, built when it changed."""
        key = (job.submitted_at, auto)
        hit = self._demands.get(job.id)
        if hit is not None and hit[0] == key:
            return hit[1]
        demand = demand_of(job, auto)
        self._demands[job.id] = (key, demand)
        return demand

    def queued(self, job: JobRecord, est: Estimate | None) -> QueuedJob:
        """:func:`queued_of` ``(job, est)``, built when it changed."""
        if est is None:
            key: tuple[object, ...] = (
                job.submitted_at,
                job.team,
                job.priority,
                job.queued_at,
                job.attained_gpu_s,
            )
        else:
            key = (
                job.submitted_at,
                job.team,
                job.priority,
                job.queued_at,
                job.attained_gpu_s,
                est.remaining_s,
                est.prediction.error,
            )
        hit = self._queued.get(job.id)
        if hit is not None and hit[0] == key:
            return hit[1]
        queued = queued_of(job, est)
        self._queued[job.id] = (key, queued)
        return queued

    def keep(self, job_ids: Container[str]) -> None:
        """Forget every job not in ``job_ids`` (those no longer pending)."""
        self._demands = {k: v for k, v in self._demands.items() if k in job_ids}
        self._queued = {k: v for k, v in self._queued.items() if k in job_ids}


def running_of(
    job: JobRecord, est: Estimate | None, now: float, problem: Problem
) -> RunningJob | None:
    """An active job as the queue policy takes it (None: it holds no GPU, or its record
    cannot be read, which ``problem`` is told)."""
    try:
        if est is None:
            return running_job(job)
        return running_job(job, now + est.remaining_s, est.prediction.error)
    except Exception as exc:
        problem(job.id, "cannot count what it holds", exc)
        return None


def plan_pass(
    snapshot: ClusterSnapshot,
    queued: Sequence[QueuedJob],
    active: Sequence[JobRecord],
    demands: Mapping[str, Demand],
    estimates: Mapping[str, Estimate],
    queue: QueuePolicy,
    policy: PlacementPolicy,
    now: float,
    problem: Problem,
) -> tuple[QueuePlan, list[Decision]]:
    """Plan the ``queued`` jobs against ``active`` ones, then place what may start.

    The jobs the plan preempts for (``victims_of``) are left out of placement
    until their victims have stopped; the caller asks those to stop.
    """
    running = [r for j in active if (r := running_of(j, estimates.get(j.id), now, problem))]
    queue_plan = plan(
        queued,
        running,
        {n.node_id: len(n.gpus) for n in snapshot.nodes},
        queue,
        now,
        node_labels(snapshot.nodes),
    )
    victims_of = queue_plan.victims_of
    startable = {j: demands[j] for j in queue_plan.order if j not in victims_of}
    return queue_plan, place_plan(snapshot, queue_plan, startable, policy)
