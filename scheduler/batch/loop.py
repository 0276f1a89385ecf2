"""The reconcile loop: the one component that acts on jobs.

Each pass (1) carries out cancel requests, (2) polls the workers of scheduled
and running jobs and records what they report, and (3) places pending jobs
with the pure placement core and launches them. Every state change is written
to the store *before* the side effect it describes, so a restarted loop can
reconcile the store with what is really running.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from scheduler.batch.demands import (
    assignment_of,
    auto_gpu_memory_of,
    running_since,
)
from scheduler.batch.history import JobHistory, elapsed_s, family_keys
from scheduler.batch.lease import Lease
from scheduler.batch.metrics import SchedulerMetrics
from scheduler.batch.placement_pass import Estimate as _Estimate
from scheduler.batch.placement_pass import PendingInputs, plan_pass, running_of, snapshot_of
from scheduler.batch.predictions import Forecaster, ForecastInputs, JobPrediction
from scheduler.batch.store import JobFields, JobRecord, JobStore
from scheduler.core.backoff import backoff_s
from scheduler.core.gpu_memory import AutoGpuMemory
from scheduler.core.model import (
    ClusterSnapshot,
    Demand,
    Holding,
    PlacementPolicy,
    QueuePolicy,
)
from scheduler.core.placement import place
from scheduler.core.predictor import predict
from scheduler.core.preemption import choose_victims, without_jobs
from scheduler.core.states import JobState
from workers.interface.errors import NotLeader
from workers.interface.executor import (
    Assignment,
    Executor,
    LaunchRequest,
    NodeAssignment,
    WorkerPhase,
    WorkerReport,
)
from workers.interface.telemetry import GpuUuid, NodeReading

log = logging.getLogger(__name__)

ACTIVE = (JobState.SCHEDULED, JobState.RUNNING)


class ClusterSource(Protocol):
    def nodes(self, fresh: bool = False) -> tuple[NodeReading, ...]:
        """The latest telemetry of every live node; ``fresh`` samples it now."""
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
        preempt: Callable[[Demand], str | None],
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
    retry_backoff_s: float = 2.0  # first retry after a loss or failure; doubles, up to the max
    retry_backoff_max_s: float = 60.0
    # Losses are not the job's fault and never count against max_retries; this many (say,
    # a job that takes its node down each time) fail it, saying so.
    max_losses: int = 10
    python_path: tuple[str, ...] = ()
    simulated_usage_dir: str | None = None
    node_dir: str | None = None  # the nodes' state directory (workers/node_dir.py)
    serving_cores: int = 1  # each node's first cores serve; training is pinned to the others
    public_url: str | None = None  # the API's address for users: run descriptions link there
    policy: PlacementPolicy = field(default_factory=PlacementPolicy)
    queue: QueuePolicy = field(default_factory=QueuePolicy)


@dataclass(frozen=True)
class QueueEntry:
    """A pending job as ``GET /queue`` shows it; the predictions are None when unknown."""

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


def rendezvous_port(job_id: str, attempt: int) -> int:
    """A gang's torch.distributed port on rank 0's node, the same for all its ranks.

    Derived from the job and attempt, in 20000-31999: above Ray's worker ports
    (10002-19999) and below Linux's ephemeral range (32768+), where outgoing
    connections could take it first. Two gangs whose rank 0 share a node
    collide with probability 1/12,000.
    """
    return 20000 + zlib.crc32(f"{job_id}/{attempt}".encode()) % 12000


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
        lease: Lease | None = None,
        history: JobHistory | None = None,
        forecaster: Forecaster | None = None,
        metrics: SchedulerMetrics | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics or SchedulerMetrics()
        self._history = history
        self._forecaster = forecaster
        self._families: dict[str, tuple[str, ...]] = {}  # each job's family keys, kept
        self._inputs = PendingInputs()  # each pending job's demand and queue entry, kept
        self._lease = lease
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
        self._next_change_at: float | None = None
        self._noted: dict[str, str] = {}  # the last problem noted in each job's history
        self._unwritten: dict[str, str] = {}  # log chunks a full disk refused, kept to retry
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
        if self._lease is not None:
            self._lease.release()

    @property
    def leading(self) -> bool:
        """Whether this control plane acts on jobs (it holds the leader lease, or needs none)."""
        return self._lease is None or self._lease.leading

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
        """One pass over every pending and active job.

        A problem with one job (a spec the planner cannot convert, a worker that
        cannot be asked, a log the disk refuses) is noted in that job's history
        and never stops the pass for the others; a problem of a whole step (Ray
        unreachable, the real-time lane failing) is logged and the next step runs.
        A standby (another control plane holds the lease) does nothing.
        """
        if self._lease is not None and not self._lease.renew():
            self._queue = []
            return
        left_out: set[str] = set()

        def unreadable(job_id: str, exc: Exception) -> None:
            left_out.add(job_id)
            self._job_problem(job_id, "left out: its stored spec cannot be read", exc)

        jobs = self._store.all_in([JobState.PENDING, *ACTIVE], unreadable=unreadable)
        pending = [j for j in jobs if j.state is JobState.PENDING]
        active = [j for j in jobs if j.state in ACTIVE]
        pending = self._cancel_pending(pending)
        self._request_stops(active)
        self._step("observing the running jobs", lambda: self._observe(active))
        if self._realtime is not None:
            realtime = self._realtime
            self._step(
                "reconciling the real-time lane",
                lambda: realtime.reconcile(
                    self._snapshot, self._settings.policy, self._preempt_for
                ),
            )
        with self._metrics.placement_pass():
            self._place(pending, active)
        ids = {j.id for j in jobs} | left_out
        self._families = {k: v for k, v in self._families.items() if k in ids}
        for job_id in [k for k in self._unwritten if k not in ids]:  # it ended meanwhile
            self._append_log(job_id, "")
        self._noted = {k: v for k, v in self._noted.items() if k in ids}

    def _active(self) -> list[JobRecord]:
        """The scheduled and running jobs; an unreadable one was noted at the pass's start."""
        return self._store.all_in(ACTIVE, unreadable=lambda job_id, exc: None)

    @staticmethod
    def _step(what: str, act: Callable[[], None]) -> None:
        try:
            act()
        except Exception:
            log.exception("%s failed; the pass goes on", what)

    def _job_problem(self, job_id: str, what: str, exc: Exception) -> None:
        """Note a problem with one job in its history (once while it lasts) and go on."""
        reason = f"{what}: {type(exc).__name__}: {exc}"
        log.warning("job %s: %s", job_id, reason, exc_info=exc)
        if self._noted.get(job_id) == reason:
            return
        self._noted[job_id] = reason
        try:
            self._store.note(job_id, reason)
        except Exception:
            log.exception("could not note the problem of job %s", job_id)

    def log_path(self, job_id: str) -> Path:
        return self._settings.log_dir / f"{job_id}.log"

    def _snapshot(self, fresh: bool = False) -> ClusterSnapshot:
        """Telemetry (``fresh``: sampled now) plus every holding: jobs' and replicas'."""
        active = self._active()
        realtime = () if self._realtime is None else self._realtime.holdings()
        nodes = self._cluster.nodes(fresh=fresh)
        return snapshot_of(nodes, active, realtime, self._job_problem)

    def held_gpus(self) -> set[GpuUuid]:
        """The UUIDs of the GPUs that active jobs and real-time replicas hold now."""
        placed = (j.assignment.nodes for j in self._active() if j.assignment)
        held = {uuid for nodes in placed for node in nodes for uuid in node.gpu_uuids}
        if self._realtime is not None:
            held.update(uuid for h in self._realtime.holdings() for uuid in h.gpu_uuids)
        return held

    def _plannable(
        self, ready: list[JobRecord], estimates: dict[str, _Estimate]
    ) -> dict[str, Demand]:
        """What each job the planner can take demands; one it cannot (say, numbers that
        overflow) fails with the reason, instead of stopping every pass for every other."""
        demands: dict[str, Demand] = {}
        for job in ready:
            try:
                demands[job.id] = self._inputs.demand(job, self._auto(job, estimates))
            except Exception as exc:
                reason = f"the scheduler cannot plan it: {type(exc).__name__}: {exc}"
                log.warning("job %s: %s", job.id, reason)
                try:
                    self._store.transition(job.id, JobState.FAILED, reason, error=reason)
                except Exception as store_exc:
                    self._job_problem(job.id, "could not fail it", store_exc)
        return demands

    def _cancel_pending(self, pending: list[JobRecord]) -> list[JobRecord]:
        keep = []
        for job in pending:
            if not job.cancel_requested:
                keep.append(job)
                continue
            try:
                self._store.transition(job.id, JobState.CANCELLED, "cancelled before it started")
            except Exception as exc:
                self._job_problem(job.id, "could not cancel it", exc)
        return keep

    def _request_stops(self, active: Sequence[JobRecord]) -> None:
        """Ask the workers of cancelled and preempted jobs to stop, once each.

        Also after a restart, or when an earlier request could not be delivered:
        the store, not this process's memory, says which jobs must stop.
        """
        for job in active:
            if job.id in self._stopping:
                continue
            if job.cancel_requested:
                self._stop(job.id, self._settings.stop_grace_s)
            elif job.preempt_reason:
                self._stop(job.id, self._settings.preempt_grace_s)

    def _stop(self, job_id: str, grace_s: float) -> None:
        try:
            self._executor.stop(job_id, grace_s)
        except Exception as exc:  # asked again at the next pass
            self._job_problem(job_id, "could not ask its worker to stop", exc)
        else:
            self._stopping.add(job_id)

    def _observe(self, active: Sequence[JobRecord]) -> None:
        if not active:
            return
        world = {j.id: len(j.assignment.nodes) for j in active if j.assignment}
        reports = self._executor.poll([j.id for j in active], world)
        for job in active:
            try:
                self._apply(job, reports[job.id])
            except Exception as exc:  # tried again with the next report
                self._job_problem(job.id, "could not record what its worker reported", exc)

    def _append_log(self, job_id: str, chunk: str) -> None:
        """Append a chunk of the job's output; a chunk the disk refuses is kept and retried."""
        chunk = self._unwritten.pop(job_id, "") + chunk
        if not chunk:
            return
        path = self.log_path(job_id)
        try:
            with path.open("a", encoding="utf-8") as fh:
                fh.write(chunk)
        except OSError as exc:
            self._unwritten[job_id] = chunk
            self._job_problem(
                job_id, f"could not write its log to {path} (output kept, retried)", exc
            )

    def _apply(self, job: JobRecord, report: WorkerReport) -> None:
        self._append_log(job.id, report.logs or "")
        updates: JobFields = {}
        if report.progress and report.progress != job.progress:
            updates["progress"] = report.progress
        if report.run_id and report.run_id != job.run_id:
            updates["run_id"] = report.run_id
        pids = report.rank_pids or (report.pid,)
        known = tuple(n.pid for n in job.assignment.nodes) if job.assignment else ()
        if job.assignment and any(pids) and pids != known:
            updates["assignment"] = job.assignment.with_pids(pids)
        phase = report.phase
        if phase is WorkerPhase.RUNNING and job.state is JobState.SCHEDULED:
            self._store.transition(
                job.id, JobState.RUNNING, f"job process started (pid {report.pid})", **updates
            )
            self._metrics.running(job.id, job.team)
        elif phase.finished:
            self._finish(job, report, updates)
        elif updates:
            self._store.update(job.id, **updates)

    def _finish(self, job: JobRecord, report: WorkerReport, updates: JobFields) -> None:
        phase = report.phase
        max_retries = job.spec.max_retries
        if phase is WorkerPhase.SUCCEEDED:
            version = f" as model version {report.model_version}" if report.model_version else ""
            updates["model_version"] = report.model_version
            self._store.transition(
                job.id, JobState.SUCCEEDED, f"training finished{version}", **updates
            )
        elif job.cancel_requested:
            self._store.transition(job.id, JobState.CANCELLED, "cancelled by request", **updates)
        elif job.preempt_reason:
            self._requeue_preempted(job, job.preempt_reason, updates)
        elif phase is WorkerPhase.STOPPED:
            self._store.transition(job.id, JobState.CANCELLED, "stopped", **updates)
        elif phase is WorkerPhase.LOST and job.losses < self._settings.max_losses:
            updates["losses"] = losses = job.losses + 1
            self._metrics.retried(job.team, "lost")
            self._retry(
                job,
                updates,
                losses,
                f"lost: {report.error}",
                f"requeued (loss {losses}, not counted against max_retries)",
            )
        elif phase is WorkerPhase.FAILED and report.retryable and job.failures < max_retries:
            updates["failures"] = failures = job.failures + 1
            self._metrics.retried(job.team, "failed")
            self._retry(
                job,
                updates,
                failures,
                f"failed: {report.error}",
                f"retry {failures} of {max_retries}",
            )
        else:
            error = report.error or "failed"
            if phase is WorkerPhase.LOST:
                error = f"lost {job.losses + 1} times (max_losses); the last time: {error}"
            updates["error"] = error
            updates["failures"] = job.failures + (phase is WorkerPhase.FAILED)
            self._store.transition(job.id, JobState.FAILED, error, **updates)
        self._stopping.discard(job.id)
        self._metrics.ended(job.id)
        self._executor.release(job.id)

    def _retry(
        self, job: JobRecord, updates: JobFields, count: int, cause: str, counted: str
    ) -> None:
        """Back to PENDING after a backoff; it resumes from its last checkpoint, same run."""
        settings = self._settings
        wait_s = backoff_s(count, settings.retry_backoff_s, settings.retry_backoff_max_s)
        updates["assignment"] = None
        updates["not_before"] = self._clock() + wait_s
        updates["resume_reason"] = cause
        self._store.transition(
            job.id,
            JobState.PENDING,
            f"{cause}; {counted}; resumes in {wait_s:g} s from its last checkpoint",
            **updates,
        )

    def _requeue_preempted(self, job: JobRecord, reason: str, updates: JobFields) -> None:
        self._metrics.preempted(job.team)
        if job.state is JobState.SCHEDULED:  # stopped before it ran: nothing to checkpoint
            updates["assignment"] = None
            updates["preempt_reason"] = None
            self._store.transition(job.id, JobState.PENDING, reason, **updates)
            return
        self._store.transition(job.id, JobState.PREEMPTED, reason, **updates)
        self._store.transition(
            job.id,
            JobState.PENDING,
            "requeued; it resumes from its last checkpoint in the same MLflow run",
            assignment=None,
            preempt_reason=None,
            preemptions=job.preemptions + 1,
            resume_reason=reason,
        )

    def _preempt_for(self, demand: Demand) -> str | None:
        """Stop the cheapest batch jobs whose capacity lets ``demand`` (a replica) fit.

        Returns what is being done to make room, or None when preempting would
        not help. Jobs already stopping count as freed: no second victim is
        chosen while the first one checkpoints. Decided on telemetry sampled
        now, not the pass's: a victim that stopped since the last sample still
        shows its memory there, and would cost a second, needless victim.
        """
        snapshot = self._snapshot(fresh=True)
        if place(snapshot, [demand], self._settings.policy)[0].placed:
            return "room was freed just now; it starts at the next pass"
        active = self._active()
        stopping = [j for j in active if j.preempt_reason]
        base = without_jobs(snapshot, [j.id for j in stopping])
        if stopping and place(base, [demand], self._settings.policy)[0].placed:
            return "waiting for " + ", ".join(j.id for j in stopping) + " to checkpoint and stop"
        candidates = sorted(
            (j for j in active if not j.preempt_reason and j.assignment and j.assignment.gpus),
            key=lambda j: (j.priority, -(j.attempt_started_at or j.submitted_at)),
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
        """The pending jobs in the order the last pass considered them, with why each waits
        and, once forecast, when each is predicted to start and end."""
        if self._forecaster is None:
            return list(self._queue)
        out = []
        for entry in self._queue:
            p = self._forecaster.prediction(entry.job_id)
            if p is not None:
                entry = replace(
                    entry,
                    predicted_start_at=p.start_at,
                    predicted_end_at=p.end_at,
                    predicted_duration_s=p.duration_s,
                    predicted_spread_s=p.spread_s,
                    prediction_basis=p.basis,
                )
            out.append(entry)
        return out

    def prediction(self, job_id: str) -> JobPrediction | None:
        """The latest forecast of a pending or running job (None: not forecast yet)."""
        return None if self._forecaster is None else self._forecaster.prediction(job_id)

    def _estimates(self, jobs: Iterable[JobRecord], now: float) -> dict[str, _Estimate]:
        """The jobs whose family has history: their predictions from the latest history."""
        if self._history is None:
            return {}
        history = self._history.latest
        out: dict[str, _Estimate] = {}
        alike: dict[tuple[tuple[str, ...], float], _Estimate | None] = {}  # a family's jobs
        for job in jobs:
            keys = self._families.get(job.id)
            if keys is None:
                keys = self._families[job.id] = family_keys(job)
            ran_s = elapsed_s(job, now)
            if (keys, ran_s) not in alike:
                p = predict(history, keys)
                alike[keys, ran_s] = None if p is None else _Estimate(p, p.remaining_s(ran_s))
            est = alike[keys, ran_s]
            if est is not None:
                out[job.id] = est
        return out

    @property
    def next_change_at(self) -> float | None:
        """When the last pass's plan may change with no arrival or end (the queue policy's
        ``next_change_at``: a demotion, a protection running out), or None."""
        return self._next_change_at

    def _place(self, pending: list[JobRecord], active: list[JobRecord]) -> None:
        now = self._clock()
        self._inputs.keep({j.id for j in pending})
        estimates = self._estimates([*pending, *active], now)
        reasons: dict[str, list[str]] = {}
        for job in pending:
            if job.not_before is not None and job.not_before > now:
                reasons[job.id] = [f"retry: backing off for {job.not_before - now:.0f} s more"]
        demands = self._plannable([j for j in pending if j.id not in reasons], estimates)
        placed: set[str] = set()
        order: list[str] = []
        self._next_change_at = None
        if demands:
            ready = [j for j in pending if j.id in demands]
            order, placed = self._place_ready(ready, demands, now, reasons, estimates)
        self._record_queue(pending, order, placed, reasons)
        if self._forecaster is not None:
            waiting = [j for j in pending if j.id not in placed]
            self._step(
                "handing the queue to the forecast",
                lambda: self._forecast(waiting, estimates, now),
            )

    def _forecast(
        self, waiting: list[JobRecord], estimates: dict[str, _Estimate], now: float
    ) -> None:
        """Hand the forecaster the queue as this pass left it (the jobs it placed running)."""
        assert self._forecaster is not None
        active = self._active()
        for job in active:
            if job.id not in estimates:  # placed in this pass: estimated as pending
                estimates.update(self._estimates([job], now))
        jobs = [*waiting, *active]
        self._forecaster.submit(
            ForecastInputs(
                pending=[self._inputs.queued(j, estimates.get(j.id)) for j in waiting],
                running=[
                    r
                    for j in active
                    if (r := running_of(j, estimates.get(j.id), now, self._job_problem))
                ],
                node_gpus={n.node_id: len(n.gpus) for n in self._cluster.nodes()},
                policy=self._settings.queue,
                now=now,
                started_at={j.id: running_since(j) for j in active},
                predictions={j.id: e.prediction for j in jobs if (e := estimates.get(j.id))},
                remaining_s={j.id: e.remaining_s for j in jobs if (e := estimates.get(j.id))},
                unknown_s=self._cluster_median_s(),
            )
        )

    def _cluster_median_s(self) -> float | None:
        """The median run time of the cluster's recent jobs (None: no history)."""
        if self._history is None:
            return None
        p = predict(self._history.latest, ("cluster",))
        return None if p is None else p.duration_s

    @staticmethod
    def _auto(job: JobRecord, estimates: dict[str, _Estimate]) -> AutoGpuMemory | None:
        """What a ``gpu_memory_gb: auto`` job asks for now (None: it wrote a number)."""
        est = estimates.get(job.id)
        return auto_gpu_memory_of(job, None if est is None else est.prediction)

    def _place_ready(
        self,
        ready: list[JobRecord],
        demands: dict[str, Demand],
        now: float,
        reasons: dict[str, list[str]],
        estimates: dict[str, _Estimate],
    ) -> tuple[list[str], set[str]]:
        """Plan with the queue policy, preempt what it says, place what may start.

        Returns the pending jobs in the order the queue lists them (those it let start
        now first, then the others by rank) and those placed.
        """
        snapshot = self._snapshot()
        active = self._active()
        settings = self._settings
        queue_plan, decisions = plan_pass(
            snapshot,
            [self._inputs.queued(j, estimates.get(j.id)) for j in ready],
            active,
            demands,
            estimates,
            settings.queue,
            settings.policy,
            now,
            self._job_problem,
        )
        self._next_change_at = queue_plan.next_change_at
        by_id = {j.id: j for j in [*ready, *active]}
        for beneficiary, victims in queue_plan.victims_of.items():
            for victim in victims:
                job = by_id.get(victim)
                if job is not None and not job.preempt_reason:
                    self._request_preemption(
                        job, f"preempted by the queue policy for {beneficiary}"
                    )
            reasons[beneficiary] = [
                "preemption: waiting for " + ", ".join(victims) + " to checkpoint and stop"
            ]
        for job_id, why in queue_plan.reasons.items():
            reasons[job_id] = [why]
        nodes_by_id: dict[str, NodeReading] = {n.node_id: n for n in snapshot.nodes}
        placed: set[str] = set()
        for decision in decisions:
            job = by_id[decision.job_id]
            if not decision.placed:
                reasons[job.id] = list(decision.reasons)
                continue
            try:
                auto = self._auto(job, estimates)
                assignment = assignment_of(decision, nodes_by_id, auto)
                self._start(job, assignment, estimates.get(job.id), auto)
            except NotLeader as exc:  # another control plane took over: it places the rest
                log.warning("stopped placing: %s", exc)
                break
            except Exception as exc:  # still PENDING: tried again at the next pass
                self._job_problem(job.id, "could not schedule it", exc)
            else:
                placed.add(job.id)
        admitted = set(queue_plan.order)
        listed = [*queue_plan.order, *(j for j in queue_plan.ranked if j not in admitted)]
        return listed, placed

    def _start(
        self,
        job: JobRecord,
        assignment: Assignment,
        est: _Estimate | None,
        auto: AutoGpuMemory | None,
    ) -> None:
        where = "; ".join(
            f"{n.hostname} GPUs {list(n.gpu_indices) or 'none'}" for n in assignment.nodes
        )
        if auto is not None:
            where += f" ({auto.reason})"
        lease = self._lease
        self._metrics.placed(job.id, job.team, queue_wait_s=self._clock() - job.queued_at)
        predicted_s = job.predicted_s  # as predicted at its first start: its family's trust
        if job.attempts == 0 and est is not None:  # is measured by how right that was
            predicted_s = est.prediction.duration_s
        job = self._store.transition(
            job.id,
            JobState.SCHEDULED,
            f"placed on {where}",
            fence=lease.fence if lease else None,
            assignment=assignment,
            attempts=job.attempts + 1,
            pending_reasons=None,
            lease_generation=lease.generation if lease else None,
            predicted_s=predicted_s,
        )
        self._launch(job, assignment, est)

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
            if tuple(why) != j.pending_reasons:
                try:
                    self._store.update(j.id, pending_reasons=why)
                except Exception as exc:
                    self._job_problem(j.id, "could not record why it waits", exc)
            entries.append(QueueEntry(j.id, j.name, j.team, j.priority, j.submitted_at, why))
        self._queue = entries

    def _request_preemption(self, job: JobRecord, reason: str) -> None:
        """Write the reason first (a restarted loop still knows), then ask the job to stop.

        A stop that cannot be delivered now is asked again at the next pass.
        """
        try:
            self._store.update(job.id, preempt_reason=reason)
        except Exception as exc:
            self._job_problem(job.id, "could not preempt it", exc)
        else:
            self._stop(job.id, self._settings.preempt_grace_s)

    def _launch(self, job: JobRecord, assignment: Assignment, est: _Estimate | None) -> None:
        leader = assignment.leader
        tags = {
            "jobworker.job_id": job.id,
            "jobworker.attempt": str(job.attempts),
            "jobworker.node_id": leader.node_id,
            "jobworker.node": leader.hostname,
            "jobworker.gpu_ids": ",".join(map(str, leader.gpu_indices)),
            "jobworker.gpu_uuids": ",".join(leader.gpu_uuids),
            "jobworker.queue_wait_s": f"{self._clock() - job.submitted_at:.3f}",
        }
        if est is not None:  # at this attempt's start; the run's end adds the actual
            tags["jobworker.predicted_duration_s"] = f"{est.prediction.duration_s:.3f}"
            tags["jobworker.prediction_basis"] = est.prediction.basis
        world_size = len(assignment.nodes)
        if world_size > 1:
            tags["jobworker.nodes"] = ",".join(n.hostname for n in assignment.nodes)
            tags["jobworker.node_ids"] = ",".join(n.node_id for n in assignment.nodes)
        try:
            for rank, node in enumerate(assignment.nodes):
                self._executor.launch(self._request(job, node, rank, world_size, tags, leader))
        except Exception as exc:
            log.exception("launch of %s failed", job.id)
            self._executor.release(job.id)
            self._metrics.ended(job.id)
            self._store.transition(
                job.id, JobState.FAILED, f"launch failed: {exc}", error=f"launch failed: {exc}"
            )

    def _request(
        self,
        job: JobRecord,
        node: NodeAssignment,
        rank: int,
        world_size: int,
        tags: dict[str, str],
        leader: NodeAssignment,
    ) -> LaunchRequest:
        gang = world_size > 1
        return LaunchRequest(
            job_id=job.id,
            attempt=job.attempts,
            rank=rank,
            world_size=world_size,
            node=node,
            spec=job.spec,
            source_text=job.source_text,
            tracking_uri=self._settings.tracking_uri,
            run_id=job.run_id,
            resume_reason=job.resume_reason,
            preemptions=job.preemptions,
            tags=tags,
            python_path=self._settings.python_path,
            simulated_usage_dir=self._settings.simulated_usage_dir,
            node_dir=self._settings.node_dir,
            serving_cores=self._settings.serving_cores,
            master_node_id=leader.node_id if gang else None,
            master_port=rendezvous_port(job.id, job.attempts) if gang else None,
            public_url=self._settings.public_url,
        )
