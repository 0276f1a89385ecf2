"""Predicted start and end of every queued and running job: the queue simulated forward.

:func:`forecast` replays, from ``now``, the decisions the live loop and the
trace simulator make: :func:`scheduler.core.queue_policy.plan` at ``now`` and
again after every predicted end and at every ``next_change_at`` the plan asks
for; it stops the jobs the plan preempts and starts the jobs it orders, each on
the nodes the queue policy's own count model
(:class:`scheduler.core.queue_policy.Capacity`) fits it to, as
:func:`~scheduler.core.queue_policy.place_plan` would (the victims' GPUs go to
their preemptor, jobs behind a reservation use only its spare GPUs on the
reserved nodes). A job runs for ``remaining_s[job_id]``, or ``unknown_s`` when
the caller has no prediction for it. A preempted job goes back to the queue,
keeps its work up to its last checkpoint and pays ``restart_s`` when it runs
again (:mod:`scheduler.sim.preemption_cost`, as the simulator charges).

What the queue policy itself knows about run times is what the caller put in
``QueuedJob.est_duration_s`` and ``RunningJob.est_end``, as in the live loop; a
job the forecast starts carries ``est_end = start + est_duration_s``.

Not modelled: GPU memory, CPUs and host memory (a job fits where it has enough
GPUs), arrivals after ``now``, and a job's own failures. The simulation stops
once no job is pending (the ends already predicted then cannot change: only a
pending job preempts) or past ``now + horizon_s``: a job not started by then
gets ``start_at = inf``; one started but not ended keeps its predicted end.

Pure: no clock, no I/O.

>>> from scheduler.core.model import QueuedJob, QueuePolicy, RunningJob
>>> running = [RunningJob("r", "t", 0, gpus=8, node_ids=("n1",), started_at=0.0)]
>>> pending = [QueuedJob("a", "t", 0, gpus=4, submitted_at=5.0)]
>>> f = forecast(pending, running, {"n1": 8}, QueuePolicy(), 10.0, {"r": 50.0, "a": 30.0})
>>> f["a"], f["r"]
(Forecast(start_at=60.0, end_at=90.0), Forecast(start_at=0.0, end_at=60.0))
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scheduler.core.model import QueuedJob, QueuePlan, QueuePolicy, RunningJob
from scheduler.core.queue_policy import Capacity, Held, plan
from scheduler.sim.preemption_cost import CHECKPOINT_EVERY_S, RESTART_S, saved_progress_s

INF = math.inf

UNKNOWN_S = 3600.0
"""Default run time assumed for a job without a prediction; callers pass better
(the cluster's median run time, say)."""

HORIZON_S = 7 * 24 * 3600.0
"""Default length of the simulated future: a week."""


@dataclass(frozen=True, slots=True)
class Forecast:
    """A job's predicted start and end (absolute times, like ``now``).

    ``start_at``: for a running job, its current run's ``started_at``; ``inf``
    for a job not started within the horizon. ``end_at``: ``None`` when the
    job's remaining run time is unknown (the caller had no prediction), ``inf``
    when it does not end within what was simulated.

    >>> Forecast(start_at=100.0, end_at=None)
    Forecast(start_at=100.0, end_at=None)
    """

    start_at: float
    end_at: float | None


class _Job:
    """One job's state during a forecast."""

    __slots__ = (
        "attempt_at",
        "end_at",
        "est_s",
        "first_start_at",
        "gen",
        "held",
        "queued",
        "restart_s",
        "running",
        "submitted_at",
        "work_s",
    )

    def __init__(self, work_s: float, est_s: float | None, submitted_at: float) -> None:
        self.submitted_at = submitted_at  # ranks it in the queue again after a preemption
        self.work_s = work_s  # run time the current or next attempt needs, restart excluded
        self.est_s = est_s  # the policy's estimate of the same, if it has one
        self.restart_s = 0.0  # paid before work_s at the next start (after a preemption)
        self.attempt_at = 0.0  # when the current attempt started
        self.first_start_at = INF
        self.end_at = INF
        self.gen = 0  # bumped on every stop: older end events are void
        self.queued: QueuedJob | None = None
        self.running: RunningJob | None = None
        self.held: Held | None = None


class _Forward:
    """The event loop of one forecast: ends and the plan's ticks, a plan after each instant."""

    def __init__(
        self,
        node_gpus: Mapping[str, int],
        policy: QueuePolicy,
        checkpoint_every_s: float,
        restart_s: float,
    ) -> None:
        self.node_gpus, self.policy = node_gpus, policy
        self.checkpoint_every_s, self.restart_s = checkpoint_every_s, restart_s
        self.cap = Capacity(node_gpus, ())
        self.jobs: dict[str, _Job] = {}
        self.pending: dict[str, _Job] = {}
        self.running: dict[str, _Job] = {}
        self.events: list[
            tuple[float, int, str, int]
        ] = []  # (at, seq, job id or "" for a tick, gen)
        self.seq = 0
        self.tick_gen = 0

    def _push(self, at: float, job_id: str, gen: int) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, job_id, gen))

    def add_running(self, r: RunningJob, left_s: float, now: float) -> None:
        ran_s = max(0.0, now - r.started_at)
        est_s = None if r.est_end is None else max(0.0, r.est_end - r.started_at)
        # The queue policy's running job carries no submit time: after a preemption the
        # forecast ranks it by the start of its current run (after older jobs, in FIFO).
        job = self.jobs[r.job_id] = _Job(ran_s + left_s, est_s, r.started_at)
        job.first_start_at = job.attempt_at = r.started_at
        self._run(job, r, now + left_s)

    def add_pending(self, q: QueuedJob, work_s: float) -> None:
        job = self.jobs[q.job_id] = _Job(work_s, q.est_duration_s, q.submitted_at)
        job.queued = q
        self.pending[q.job_id] = job

    def _run(self, job: _Job, r: RunningJob, end_at: float) -> None:
        job.running, job.end_at = r, end_at
        job.held = Held(r.job_id, r.team, r.gpus, r.node_ids, 0, r.started_at, INF, False)
        self.cap.add(job.held)
        self.running[r.job_id] = job
        self._push(end_at, r.job_id, job.gen)

    def run(self, now: float, until: float) -> None:
        if self.pending:
            self._schedule(now)
        events = self.events
        while self.pending and events and events[0][0] <= until:
            at = events[0][0]
            changed = False
            while events and events[0][0] == at:
                _, _, job_id, gen = heapq.heappop(events)
                if not job_id:
                    changed = changed or gen == self.tick_gen  # only the latest plan's tick
                    continue
                job = self.jobs[job_id]
                if job.gen == gen and job_id in self.running:
                    self._stop(job)
                    changed = True
            if changed and self.pending:
                self._schedule(at)

    def _stop(self, job: _Job) -> RunningJob:
        r = job.running
        assert r is not None and job.held is not None
        self.cap.remove(job.held)
        del self.running[r.job_id]
        job.running = job.held = None
        job.gen += 1
        return r

    def _schedule(self, now: float) -> None:
        qp = plan(
            [j.queued for j in self.pending.values() if j.queued is not None],
            [j.running for j in self.running.values() if j.running is not None],
            self.node_gpus,
            self.policy,
            now,
        )
        self._apply(qp, now)
        if qp.next_change_at is not None:
            self.tick_gen += 1
            self._push(qp.next_change_at, "", self.tick_gen)

    def _apply(self, qp: QueuePlan, now: float) -> None:
        """Carry out ``qp`` as ``place_plan`` would, on GPU counts."""
        res = qp.reservation
        spare = {} if res is None else {n: max(0, g) for n, g in res.spare_gpus.items()}
        preempted: set[str] = set()
        for job_id in qp.order:
            for victim in qp.victims_of.get(job_id, ()):
                if victim not in preempted:
                    preempted.add(victim)
                    self._preempt(self.running[victim], now)
            job = self.pending[job_id]
            q = job.queued
            assert q is not None
            keep_off = job_id in qp.keep_off_reservation
            nodes = self.cap.fit(q.gpus, q.nodes, spare if keep_off else None)
            if not nodes:
                continue  # as placement may refuse a job the policy let start
            if keep_off:
                for n in nodes:
                    if n in spare:
                        spare[n] -= q.gpus
            self._start(job, q, nodes, now)
        for victim in qp.preempt:
            if victim not in preempted:
                self._preempt(self.running[victim], now)

    def _start(self, job: _Job, q: QueuedJob, nodes: tuple[str, ...], now: float) -> None:
        del self.pending[q.job_id]
        job.queued = None
        job.attempt_at = now
        job.first_start_at = min(job.first_start_at, now)
        est_end = None if job.est_s is None else now + job.restart_s + job.est_s
        r = RunningJob(
            q.job_id,
            q.team,
            q.priority,
            q.gpus,
            nodes,
            now,
            attained_gpu_s=q.attained_gpu_s,
            est_end=est_end,
        )
        self._run(job, r, now + job.restart_s + job.work_s)

    def _preempt(self, job: _Job, now: float) -> None:
        r = self._stop(job)
        ran_s = now - job.attempt_at
        done_s = min(job.work_s, max(0.0, ran_s - job.restart_s))
        saved_s = saved_progress_s(0.0, done_s, self.checkpoint_every_s)
        job.work_s -= saved_s
        if job.est_s is not None:
            job.est_s = max(0.0, job.est_s - saved_s)
        job.restart_s = self.restart_s
        attained = r.attained_gpu_s + ran_s * r.gpus * len(r.node_ids)
        est = None if job.est_s is None else job.restart_s + job.est_s
        job.queued = QueuedJob(
            r.job_id,
            r.team,
            r.priority,
            r.gpus,
            job.submitted_at,
            nodes=len(r.node_ids),
            attained_gpu_s=attained,
            est_duration_s=est,
            queued_at=now,
        )
        self.pending[r.job_id] = job


def forecast(
    pending: Sequence[QueuedJob],
    running: Sequence[RunningJob],
    node_gpus: Mapping[str, int],
    policy: QueuePolicy,
    now: float,
    remaining_s: Mapping[str, float],
    *,
    unknown_s: float = UNKNOWN_S,
    horizon_s: float = HORIZON_S,
    restart_s: float = RESTART_S,
    checkpoint_every_s: float = CHECKPOINT_EVERY_S,
) -> dict[str, Forecast]:
    """Every pending and running job's predicted start and end (module docstring).

    ``remaining_s``: predicted run time left per job id (for a pending job,
    its whole next run); a job missing from it runs ``unknown_s`` in the
    simulation and gets ``end_at=None``. ``restart_s`` and
    ``checkpoint_every_s``: the cost of a preemption, as in
    :class:`scheduler.sim.simulator.SimConfig`.
    """
    if math.isnan(now) or not horizon_s >= 0 or not unknown_s >= 0:
        raise ValueError("now must be a number; horizon_s and unknown_s not negative")
    ids = [r.job_id for r in running] + [q.job_id for q in pending]
    if len(set(ids)) != len(ids):
        raise ValueError("a job id appears twice among the pending and running jobs")
    fwd = _Forward(node_gpus, policy, checkpoint_every_s, restart_s)
    for r in running:
        fwd.add_running(r, max(0.0, remaining_s.get(r.job_id, unknown_s)), now)
    for q in pending:
        fwd.add_pending(q, max(0.0, remaining_s.get(q.job_id, unknown_s)))
    fwd.run(now, now + horizon_s)
    out: dict[str, Forecast] = {}
    for job_id, job in fwd.jobs.items():
        end_at = job.end_at if job_id not in fwd.pending else INF
        known = job_id in remaining_s
        out[job_id] = Forecast(job.first_start_at, end_at if known else None)
    return out
