"""The reconcile loop: the one component that acts on jobs.

Each pass (1) carries out cancel requests, (2) polls the workers of scheduled
and running jobs and records what they report, and (3) places pending jobs
with the pure placement core and launches them. Every state change is written
to the store *before* the side effect it describes, so a restarted loop can
reconcile the store with what is really running.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from scheduler.demands import (
    GIB,
    assigned_nodes,
    demand_of,
    holdings_of,
    queued_job,
    running_job,
)
from scheduler.placement import ClusterSnapshot, Demand, Holding, PlacementPolicy, place
from scheduler.preemption import choose_victims, without_jobs
from scheduler.queue_placement import place_plan
from scheduler.queue_policy import QueuePolicy
from scheduler.queue_policy import plan as plan_queue
from scheduler.spec import TrainingSpec
from scheduler.states import JobState
from scheduler.store import JobRecord, JobStore
from workers.executor import Executor, LaunchRequest, WorkerPhase, WorkerReport
from workers.telemetry import NodeReading

log = logging.getLogger(__name__)

ACTIVE = (JobState.SCHEDULED, JobState.RUNNING)


class ClusterSource(Protocol):
    def nodes(self) -> tuple[NodeReading, ...]:
        """The latest telemetry of every live node."""
        ...


class RealtimeLane(Protocol):
    """The real-time lane (``scheduler/deployments.py``), reconciled before batch jobs."""

    def holdings(self) -> tuple[Holding, ...]:
        """Capacity its replicas hold."""
        ...

    def reconcile(
        self,
        snapshot: Callable[[], ClusterSnapshot],
        policy: PlacementPolicy,
        preempt: Callable[[ClusterSnapshot, Demand], str | None],
    ) -> None:
        """Reconcile replicas; ``preempt`` makes room for a replica that fits nowhere."""
        ...


@dataclass
class LoopSettings:
    tracking_uri: str
    log_dir: Path
    interval_s: float = 0.5
    stop_grace_s: float = 5.0
    preempt_grace_s: float = 30.0  # time to checkpoint before a preempted job is killed
    retry_backoff_s: float = 2.0  # first retry after a lost worker; doubles, up to the max
    retry_backoff_max_s: float = 60.0
    python_path: tuple[str, ...] = ()
    simulated_usage_dir: str | None = None
    policy: PlacementPolicy = field(default_factory=PlacementPolicy)
    queue: QueuePolicy = field(default_factory=QueuePolicy)


@dataclass(frozen=True)
class QueueEntry:
    """A pending job as ``GET /queue`` shows it."""

    job_id: str
    name: str
    team: str
    priority: int
    submitted_at: float
    reasons: list[str]


def rendezvous_port(job_id: str, attempt: int) -> int:
    """A gang's torch.distributed port on rank 0's node, the same for all its ranks.

    Derived from the job and attempt, in 20000-31999: above Ray's worker ports
    (10002-19999) and below Linux's ephemeral range (32768+), where outgoing
    connections could take it first. Two gangs whose rank 0 share a node
    collide with probability 1/12,000.
    """
    return 20000 + zlib.crc32(f"{job_id}/{attempt}".encode()) % 12000


def _with_pids(
    assignment: dict[str, Any], pids: tuple[int | None, ...], leader_pid: int | None
) -> dict[str, Any]:
    """The assignment with each rank's job process pid (placement matches NVML by pid)."""
    nodes = [
        {**node, "pid": pid} for node, pid in zip(assigned_nodes(assignment), pids, strict=False)
    ]
    return {**assignment, "pid": leader_pid, "nodes": nodes}


class Scheduler:
    """Drives jobs from PENDING to a terminal state.

    Example::

        scheduler = Scheduler(store, executor, cluster, settings)
        scheduler.start()          # background thread
        scheduler.wake()           # after a submit or cancel: act now, not at the next tick
    """

    def __init__(
        self,
        store: JobStore,
        executor: Executor,
        cluster: ClusterSource,
        settings: LoopSettings,
        clock: Callable[[], float] = time.time,
        realtime: RealtimeLane | None = None,
    ) -> None:
        self._store = store
        self._realtime = realtime
        self._executor = executor
        self._cluster = cluster
        self._settings = settings
        self._clock = clock
        self._wake = threading.Event()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping: set[str] = set()
        self._queue: list[QueueEntry] = []
        settings.log_dir.mkdir(parents=True, exist_ok=True)

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="jobworker-loop", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._halt.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=30)

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._halt.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("scheduler pass failed; retrying at the next tick")
            self._wake.wait(self._settings.interval_s)
            self._wake.clear()

    # -- one pass ---------------------------------------------------------------------
    def run_once(self) -> None:
        jobs = self._store.find([JobState.PENDING, *ACTIVE])
        pending = [j for j in jobs if j.state is JobState.PENDING]
        active = [j for j in jobs if j.state in ACTIVE]
        pending = self._cancel_pending(pending)
        self._request_stops(active)
        self._observe(active)
        if self._realtime is not None:
            self._realtime.reconcile(self._snapshot, self._settings.policy, self._preempt_for)
        self._place(pending)

    def log_path(self, job_id: str) -> Path:
        return self._settings.log_dir / f"{job_id}.log"

    def _snapshot(self) -> ClusterSnapshot:
        """Telemetry plus every holding: running jobs' and real-time replicas'."""
        holdings = tuple(h for j in self._store.find(list(ACTIVE)) for h in holdings_of(j))
        if self._realtime is not None:
            holdings += self._realtime.holdings()
        return ClusterSnapshot(nodes=self._cluster.nodes(), holdings=holdings)

    def _cancel_pending(self, pending: list[JobRecord]) -> list[JobRecord]:
        keep = []
        for job in pending:
            if job.cancel_requested:
                self._store.transition(job.id, JobState.CANCELLED, "cancelled before it started")
            else:
                keep.append(job)
        return keep

    def _request_stops(self, active: Sequence[JobRecord]) -> None:
        for job in active:
            if job.cancel_requested and job.id not in self._stopping:
                self._stopping.add(job.id)
                self._executor.stop(job.id, self._settings.stop_grace_s)

    def _observe(self, active: Sequence[JobRecord]) -> None:
        if not active:
            return
        world = {j.id: len(assigned_nodes(j.assignment)) for j in active if j.assignment}
        reports = self._executor.poll([j.id for j in active], world)
        for job in active:
            self._apply(job, reports[job.id])

    def _apply(self, job: JobRecord, report: WorkerReport) -> None:
        if report.logs:
            with self.log_path(job.id).open("a", encoding="utf-8") as fh:
                fh.write(report.logs)
        updates: dict[str, Any] = {}
        if report.progress and report.progress != job.progress:
            updates["progress"] = report.progress
        if report.run_id and report.run_id != job.run_id:
            updates["run_id"] = report.run_id
        pids = report.rank_pids or (report.pid,)
        if job.assignment and any(pids):
            known = tuple(n.get("pid") for n in assigned_nodes(job.assignment))
            if pids != known:
                updates["assignment"] = _with_pids(job.assignment, pids, report.pid)
        phase = report.phase
        if phase is WorkerPhase.RUNNING and job.state is JobState.SCHEDULED:
            self._store.transition(
                job.id, JobState.RUNNING, f"job process started (pid {report.pid})", **updates
            )
        elif phase.finished:
            self._finish(job, report, updates)
        elif updates:
            self._store.update(job.id, **updates)

    def _finish(self, job: JobRecord, report: WorkerReport, updates: dict[str, Any]) -> None:
        phase = report.phase
        if phase is WorkerPhase.SUCCEEDED:
            version = f" as model version {report.model_version}" if report.model_version else ""
            self._store.transition(
                job.id,
                JobState.SUCCEEDED,
                f"training finished{version}",
                model_version=report.model_version,
                **updates,
            )
        elif job.cancel_requested:
            self._store.transition(job.id, JobState.CANCELLED, "cancelled by request", **updates)
        elif preempt_reason := (job.assignment or {}).get("preempt_reason"):
            self._requeue_preempted(job, preempt_reason, updates)
        elif phase is WorkerPhase.STOPPED:
            self._store.transition(job.id, JobState.CANCELLED, "stopped", **updates)
        elif (
            phase is WorkerPhase.LOST
            and (retry := job.attempts - job.preemptions) <= job.spec["max_retries"]
        ):
            backoff_s = min(
                self._settings.retry_backoff_max_s,
                self._settings.retry_backoff_s * 2 ** (retry - 1),
            )
            self._store.transition(
                job.id,
                JobState.PENDING,
                f"{report.error}; retry {retry} of {job.spec['max_retries']} in {backoff_s:g} s, "
                "from the last checkpoint",
                assignment=None,
                not_before=self._clock() + backoff_s,
                resume_reason=f"retry {retry} after: {report.error}",
                **updates,
            )
        else:
            error = report.error or "failed"
            self._store.transition(job.id, JobState.FAILED, error, error=error, **updates)
        self._stopping.discard(job.id)
        self._executor.release(job.id)

    def _requeue_preempted(self, job: JobRecord, reason: str, updates: dict[str, Any]) -> None:
        if job.state is JobState.SCHEDULED:  # stopped before it ran: nothing to checkpoint
            self._store.transition(job.id, JobState.PENDING, reason, assignment=None, **updates)
            return
        self._store.transition(job.id, JobState.PREEMPTED, reason, **updates)
        self._store.transition(
            job.id,
            JobState.PENDING,
            "requeued; it resumes from its last checkpoint in the same MLflow run",
            assignment=None,
            preemptions=job.preemptions + 1,
            resume_reason=reason,
        )

    def _preempt_for(self, snapshot: ClusterSnapshot, demand: Demand) -> str | None:
        """Stop the cheapest batch jobs whose capacity lets ``demand`` (a replica) fit.

        Returns what is being done to make room, or None when preempting would
        not help. Jobs already stopping count as freed: no second victim is
        chosen while the first one checkpoints.
        """
        active = self._store.find(list(ACTIVE))
        stopping = [j for j in active if (j.assignment or {}).get("preempt_reason")]
        base = without_jobs(snapshot, [j.id for j in stopping])
        if stopping and place(base, [demand], self._settings.policy)[0].placed:
            return "waiting for " + ", ".join(j.id for j in stopping) + " to checkpoint and stop"
        candidates = sorted(
            (j for j in active if j not in stopping and j.assignment and j.assignment["gpu_uuids"]),
            key=lambda j: (j.priority, -(j.started_at or j.submitted_at)),
        )
        victims = choose_victims(base, demand, [j.id for j in candidates], self._settings.policy)
        if not victims:
            return None
        by_id = {j.id: j for j in candidates}
        for job_id in victims:
            self._request_preemption(
                by_id[job_id], f"preempted to make room for real-time replica {demand.job_id}"
            )
        return "preempting " + ", ".join(victims) + " (they checkpoint, then requeue)"

    def queue(self) -> list[QueueEntry]:
        """The pending jobs in the order the last pass considered them, with why each waits."""
        return list(self._queue)

    def _place(self, pending: list[JobRecord]) -> None:
        now = self._clock()
        reasons: dict[str, list[str]] = {}
        for job in pending:
            if job.not_before is not None and job.not_before > now:
                reasons[job.id] = [f"retry: backing off for {job.not_before - now:.0f} s more"]
        ready = [j for j in pending if j.id not in reasons]
        placed: set[str] = set()
        order: list[str] = []
        if ready:
            order, placed = self._place_ready(ready, now, reasons)
        self._record_queue(pending, order, placed, reasons)

    def _place_ready(
        self, ready: list[JobRecord], now: float, reasons: dict[str, list[str]]
    ) -> tuple[list[str], set[str]]:
        """Plan with the queue policy, preempt what it says, place what may start."""
        snapshot = self._snapshot()
        active = self._store.find(list(ACTIVE))
        plan = plan_queue(
            [queued_job(j) for j in ready],
            [r for j in active if (r := running_job(j)) is not None],
            {n.node_id: len(n.gpus) for n in snapshot.nodes},
            self._settings.queue,
            now,
        )
        by_id = {j.id: j for j in [*ready, *active]}
        for beneficiary, victims in plan.victims_of.items():
            for victim in victims:
                job = by_id.get(victim)
                if job is not None and not (job.assignment or {}).get("preempt_reason"):
                    self._request_preemption(
                        job, f"preempted by the queue policy for {beneficiary}"
                    )
            reasons[beneficiary] = [
                "preemption: waiting for " + ", ".join(victims) + " to checkpoint and stop"
            ]
        for job_id, why in plan.reasons.items():
            reasons[job_id] = [why]
        demands = {j: demand_of(by_id[j]) for j in plan.order if j not in plan.victims_of}
        decisions = place_plan(snapshot, plan, demands, self._settings.policy)
        nodes_by_id: dict[str, NodeReading] = {n.node_id: n for n in snapshot.nodes}
        placed: set[str] = set()
        for decision in decisions:
            job = by_id[decision.job_id]
            if not decision.placed:
                reasons[job.id] = list(decision.reasons)
                continue
            placed.add(job.id)
            nodes = [
                {
                    "node_id": p.node_id,
                    "hostname": nodes_by_id[p.node_id].hostname,
                    "gpu_indices": list(p.gpu_indices),
                    "gpu_uuids": list(p.gpu_uuids),
                }
                for p in decision.placement
            ]
            # Rank 0's node at the top level; every node (rank order) under "nodes".
            assignment = {**nodes[0], "nodes": nodes}
            where = "; ".join(f"{n['hostname']} GPUs {n['gpu_indices'] or 'none'}" for n in nodes)
            job = self._store.transition(
                job.id,
                JobState.SCHEDULED,
                f"placed on {where}",
                assignment=assignment,
                attempts=job.attempts + 1,
                pending_reasons=None,
            )
            self._launch(job, assignment)
        return list(plan.order), placed

    def _record_queue(
        self,
        pending: list[JobRecord],
        order: list[str],
        placed: set[str],
        reasons: dict[str, list[str]],
    ) -> None:
        """Store each waiting job's reasons and keep the queue's order for ``queue()``."""
        position = {job_id: i for i, job_id in enumerate(order)}
        waiting = sorted(
            (j for j in pending if j.id not in placed),
            key=lambda j: (position.get(j.id, len(order)), -j.priority, j.submitted_at),
        )
        entries = []
        for j in waiting:
            why = reasons.get(j.id) or ["next: may start when placed"]
            if why != j.pending_reasons:
                self._store.update(j.id, pending_reasons=why)
            entries.append(QueueEntry(j.id, j.name, j.team, j.priority, j.submitted_at, why))
        self._queue = entries

    def _request_preemption(self, job: JobRecord, reason: str) -> None:
        """Write the reason first (a restarted loop still knows), then ask the job to stop."""
        self._store.update(job.id, assignment={**(job.assignment or {}), "preempt_reason": reason})
        self._executor.stop(job.id, self._settings.preempt_grace_s)

    def _launch(self, job: JobRecord, assignment: dict[str, Any]) -> None:
        queue_wait_s = self._clock() - job.submitted_at
        tags = {
            "jobworker.job_id": job.id,
            "jobworker.attempt": str(job.attempts),
            "jobworker.node_id": assignment["node_id"],
            "jobworker.node": assignment["hostname"],
            "jobworker.gpu_ids": ",".join(map(str, assignment["gpu_indices"])),
            "jobworker.gpu_uuids": ",".join(assignment["gpu_uuids"]),
            "jobworker.queue_wait_s": f"{queue_wait_s:.3f}",
        }
        train_params = (
            dataclasses.asdict(TrainingSpec.model_validate(job.spec).train_params())
            if job.spec.get("model")
            else None
        )
        nodes = assigned_nodes(assignment)
        if len(nodes) > 1:
            tags["jobworker.nodes"] = ",".join(n["hostname"] for n in nodes)
            tags["jobworker.node_ids"] = ",".join(n["node_id"] for n in nodes)
        try:
            for rank, node in enumerate(nodes):
                self._executor.launch(
                    self._request(job, node, rank, len(nodes), tags, train_params, nodes[0])
                )
        except Exception as exc:
            log.exception("launch of %s failed", job.id)
            self._executor.release(job.id)
            self._store.transition(
                job.id, JobState.FAILED, f"launch failed: {exc}", error=f"launch failed: {exc}"
            )

    def _request(
        self,
        job: JobRecord,
        node: dict[str, Any],
        rank: int,
        world_size: int,
        tags: dict[str, str],
        train_params: dict[str, Any] | None,
        leader: dict[str, Any],
    ) -> LaunchRequest:
        return LaunchRequest(
            job_id=job.id,
            attempt=job.attempts,
            node_id=node["node_id"],
            gpu_indices=tuple(node["gpu_indices"]),
            gpu_uuids=tuple(node["gpu_uuids"]),
            gpu_memory_bytes=int(job.spec["resources"]["gpu_memory_gb"] * GIB),
            cpus=job.spec["resources"]["cpus"],
            spec=job.spec,
            source_text=job.source_text,
            tracking_uri=self._settings.tracking_uri,
            train_params=train_params,
            run_id=job.run_id,
            resume_reason=job.resume_reason,
            preemptions=job.preemptions,
            tags=tags,
            python_path=self._settings.python_path,
            simulated_usage_dir=self._settings.simulated_usage_dir,
            rank=rank,
            world_size=world_size,
            master_node_id=leader["node_id"] if world_size > 1 else None,
            master_port=rendezvous_port(job.id, job.attempts) if world_size > 1 else None,
        )
