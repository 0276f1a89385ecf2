"""Queue policy: which pending jobs may start now, whom to preempt, and why the rest wait.

Pure, like placement: (pending jobs, running jobs, GPUs per node, policy, now)
-> :class:`QueuePlan`. No I/O, no clock reads; the live reconcile loop and the
trace simulator (``scheduler.simulator``) call the same :func:`plan`. It works
on GPU *counts* per node; placement then picks the GPUs (see
``scheduler.queue_placement.place_plan``).

The rules, by precedence:

1. **Rank.** Priority classes first. Waiting raises a job's priority by one per
   ``aging_s_per_priority`` seconds since it (re)entered the queue (aging), so
   low priority still runs. In ``las`` mode a job's rank also falls one step
   per service queue it has reached: its attained service (GPUs x seconds run,
   as Tiresias' 2D-LAS) against ``las_thresholds_gpu_s``; a priority class
   outweighs every queue.
2. **Quotas.** ``quotas[team]`` GPUs are the team's own. A job that keeps its
   team within quota goes before jobs of its rank that would borrow; a
   borrowing job starts only on idle GPUs (other teams' unused quota is lent),
   and a job within quota takes borrowed GPUs back by preemption (reclaim). A
   team without an entry borrows everything it holds. No quotas: no borrowing.
3. **Fair share.** Among jobs of one rank, the team with the fewest GPUs per
   unit of ``weights[team]`` (default 1) goes next, counting the GPUs it holds
   and those of its jobs already ordered.
4. **Within a team:** ``fifo`` by submit time; ``sjf`` by estimated remaining
   run time (``est_duration_s``; unknown last), then submit time; ``las``
   within a queue the same way (by submit time when, as usual, no job has an
   estimate).
5. **Backfill (EASY).** The first job that can start neither now nor by
   preemption is the head. It gets a reservation: the earliest time, from the
   running jobs' estimated ends, when enough nodes have enough free GPUs
   (``inf`` when that needs jobs without an estimate to end: the reserved
   nodes then drain). A later job starts now only if it does not delay that:
   it ends by the reserved start, or it uses only the reserved nodes' spare
   GPUs (free then beyond the head's need). ``backfill=False``: nothing
   passes the head (strict order).
6. **Preemption.** A job that cannot start may preempt running jobs that are
   preemptible and have run ``min_run_s`` since their last start (so a restart
   pays off) when it outranks them (when quotas are set: jobs of its own team
   or borrowing ones), or, whatever the ranks, when it is within its team's
   quota and they borrow (reclaim). Per node, victims go lowest rank first,
   then the most recently started; the nodes chosen are those where the
   fewest GPUs must be freed. Jobs after the head preempt off the reserved
   nodes only. ``preemption=False``: never.

A pass of the live loop: one :class:`QueuedJob` per PENDING job (its
attained service from earlier runs, ``queued_at`` its last requeue) and one
:class:`RunningJob` per job holding GPUs (``preemptible=False`` while it is
being stopped); ``node_gpus`` from the snapshot; then ``plan(...)``, stop the
jobs in ``preempt`` (checkpoint first), place ``order`` with
``queue_placement.place_plan`` (leaving out, until their victims are gone,
the jobs in ``victims_of``), store ``reasons`` as the pending reasons, and
come back no later than ``next_change_at``.

>>> job = QueuedJob("j1", "ml", 0, gpus=2, submitted_at=0.0)
>>> p = plan([job], running=[], node_gpus={"n1": 8}, policy=QueuePolicy(), now=5.0)
>>> p.order, p.preempt
(('j1',), ())
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from scheduler.queue_capacity import INF
from scheduler.queue_walk import RANK_STEP, Walk
from scheduler.queue_walk import las_queue as las_queue  # re-exported (public API)

Mode = Literal["fifo", "sjf", "las"]
MODES: tuple[Mode, ...] = ("fifo", "sjf", "las")


@dataclass(frozen=True, slots=True)
class QueuedJob:
    """A pending job: ``gpus`` on each of ``nodes`` nodes.

    ``attained_gpu_s`` is the service it already had (runs before a
    preemption); ``est_duration_s`` its estimated *remaining* run time, if
    the caller has one; ``queued_at`` when it last entered the queue (aging
    counts from there; default ``submitted_at``).

    >>> QueuedJob("train-7", "vision", 0, gpus=4, submitted_at=100.0).total_gpus
    4
    """

    job_id: str
    team: str
    priority: int
    gpus: int
    submitted_at: float
    nodes: int = 1
    attained_gpu_s: float = 0.0
    est_duration_s: float | None = None
    queued_at: float | None = None

    @property
    def total_gpus(self) -> int:
        """GPUs over all its nodes."""
        return self.gpus * self.nodes


@dataclass(frozen=True, slots=True)
class RunningJob:
    """A job holding GPUs: ``gpus`` on each node of ``node_ids``, since ``started_at``.

    ``attained_gpu_s`` is its service *before* ``started_at`` (the policy adds
    the current run); ``est_end`` its estimated end, if known. Pass a job that
    is being stopped with ``preemptible=False``: it still holds its GPUs.

    >>> RunningJob("train-3", "nlp", 0, gpus=8, node_ids=("n1",), started_at=0.0).est_end is None
    True
    """

    job_id: str
    team: str
    priority: int
    gpus: int
    node_ids: tuple[str, ...]
    started_at: float
    attained_gpu_s: float = 0.0
    est_end: float | None = None
    preemptible: bool = True


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    """The knobs of the rules in this module's docstring.

    >>> QueuePolicy(mode="las", las_thresholds_gpu_s=(3600.0,), quotas={"nlp": 16}).mode
    'las'
    """

    mode: Mode = "fifo"
    backfill: bool = True
    preemption: bool = True
    quotas: Mapping[str, int] = field(default_factory=dict)
    weights: Mapping[str, float] = field(default_factory=dict)
    aging_s_per_priority: float | None = 3600.0
    las_thresholds_gpu_s: tuple[float, ...] = (3600.0, 36000.0)
    min_run_s: float = 300.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown queue mode {self.mode!r}; expected one of {MODES}")
        if self.aging_s_per_priority is not None and self.aging_s_per_priority <= 0:
            raise ValueError("aging_s_per_priority must be positive (or None: no aging)")
        thresholds = self.las_thresholds_gpu_s
        if list(thresholds) != sorted(thresholds) or len(thresholds) >= RANK_STEP:
            raise ValueError(f"las_thresholds_gpu_s must ascend, fewer than {RANK_STEP}")
        if any(w <= 0 for w in self.weights.values()):
            raise ValueError("team weights must be positive")
        if any(q < 0 for q in self.quotas.values()):
            raise ValueError("team quotas must not be negative")


@dataclass(frozen=True, slots=True)
class Reservation:
    """The head job's reserved start: ``start_at`` (maybe ``inf``) on ``node_ids``.

    ``spare_gpus``: per reserved node, the GPUs free at ``start_at`` beyond the
    head's need, which jobs that may run past ``start_at`` are allowed to use.
    """

    job_id: str
    start_at: float
    node_ids: tuple[str, ...]
    spare_gpus: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class QueuePlan:
    """One pass's decision.

    ``order``: pending jobs that may start now, to be placed in this order
    (placement may still refuse one). ``preempt``: running jobs to stop;
    ``victims_of`` says for which job of ``order`` (their GPUs are that job's:
    the jobs before it in ``order`` must not take them). ``keep_off_reservation``:
    the jobs of ``order`` that may use only the reservation's spare GPUs on its
    nodes. ``reasons``: why each other pending job waits. ``next_change_at``:
    the earliest time the plan may change without an arrival or an end (a
    queue demotion, aging, a protection running out), or None.
    """

    order: tuple[str, ...]
    preempt: tuple[str, ...]
    reasons: Mapping[str, str]
    reservation: Reservation | None = None
    keep_off_reservation: frozenset[str] = frozenset()
    next_change_at: float | None = None
    victims_of: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def _order(
    pending: Sequence[QueuedJob], policy: QueuePolicy, now: float, usage: Mapping[str, int]
) -> list[tuple[QueuedJob, int]]:
    """Pending jobs by rules 1-4, each with its rank."""
    aging, las = policy.aging_s_per_priority, policy.mode == "las"
    thresholds, by_est = policy.las_thresholds_gpu_s, policy.mode != "fifo"
    keyed: list[tuple[int, float, float, str, int]] = []  # sorts as rules 1 and 4 say
    for i, job in enumerate(pending):
        level = job.priority
        if aging is not None:
            since = job.submitted_at if job.queued_at is None else job.queued_at
            level += max(0, int((now - since) // aging))
        rank = level * RANK_STEP - (las_queue(job.attained_gpu_s, thresholds) if las else 0)
        if by_est:
            est = INF if job.est_duration_s is None else job.est_duration_s
            keyed.append((-rank, est, job.submitted_at, job.job_id, i))
        else:
            keyed.append((-rank, job.submitted_at, 0.0, job.job_id, i))
    quotas = policy.quotas
    if not quotas and len({job.team for job in pending}) <= 1:
        keyed.sort()
        return [(pending[k[4]], -k[0]) for k in keyed]
    levels: dict[int, dict[str, list[tuple[int, float, float, str, int]]]] = {}
    for k in keyed:
        levels.setdefault(-k[0], {}).setdefault(pending[k[4]].team, []).append(k)
    share = dict(usage)  # GPUs held plus GPUs of jobs ordered so far, per team
    out: list[tuple[QueuedJob, int]] = []
    for rank in sorted(levels, reverse=True):
        teams = levels[rank]
        for ks in teams.values():
            ks.sort(reverse=True)  # pop() gives the next by rule 4
        while teams:
            _, team = min(
                (_team_key(t, ks[-1], pending, share, policy), t) for t, ks in teams.items()
            )
            job = pending[teams[team].pop()[4]]
            out.append((job, rank))
            share[team] = share.get(team, 0) + job.total_gpus
            if not teams[team]:
                del teams[team]
    return out


def _team_key(
    team: str,
    k: tuple[int, float, float, str, int],
    pending: Sequence[QueuedJob],
    share: Mapping[str, int],
    policy: QueuePolicy,
) -> tuple[bool, float, tuple[int, float, float, str, int]]:
    """Rules 2-4 between teams: within quota first, then the lowest weighted share."""
    held, quotas = share.get(team, 0), policy.quotas
    borrowing = bool(quotas) and held + pending[k[4]].total_gpus > quotas.get(team, 0)
    return (borrowing, held / policy.weights.get(team, 1.0), k)


def plan(
    pending: Sequence[QueuedJob],
    running: Sequence[RunningJob],
    node_gpus: Mapping[str, int],
    policy: QueuePolicy,
    now: float,
) -> QueuePlan:
    """Order the queue and decide preemptions for one pass (rules in the module docstring).

    ``node_gpus``: the schedulable GPUs of each node. Running jobs on nodes not
    listed still count toward their team's quota. Every pending job is either
    in ``order`` or has a reason.
    """
    if math.isnan(now):
        raise ValueError("now must be a number")
    if len({j.job_id for j in pending}) != len(pending):
        raise ValueError("a job id appears twice among the pending jobs")
    usage: dict[str, int] = {}
    for r in running:
        usage[r.team] = usage.get(r.team, 0) + r.gpus * len(r.node_ids)
    queue = _order(pending, policy, now, usage)
    w = Walk(running, node_gpus, policy, now).run(queue)
    reservation = None
    if w.head is not None and w.hold is not None:
        h = w.hold
        reservation = Reservation(w.head.job_id, h.start_at, h.node_ids, h.spare)
    return QueuePlan(
        order=tuple(w.order),
        preempt=tuple(w.preempt),
        reasons=w.reasons,
        reservation=reservation,
        keep_off_reservation=frozenset(w.keep_off),
        next_change_at=w.next_change(queue),
        victims_of=w.victims_of,
    )
