"""Queue policy: which pending jobs may start now, whom to preempt, and why the rest wait.

Pure, like placement: (pending jobs, running jobs, GPUs per node, policy, now)
-> :class:`QueuePlan`. No I/O, no clock reads; the live reconcile loop and the
trace simulator (``scheduler.sim.simulator``) call the same :func:`plan`. It works
on GPU *counts* per node; placement then picks the GPUs (see
:func:`place_plan`).

The rules, by precedence:

1. **Rank.** Priority classes first. Waiting raises a job's priority by one per
   ``aging_s_per_priority`` seconds since it (re)entered the queue (aging), so
   low priority still runs. In ``las`` mode a job's rank also falls one step
   per service queue it has reached: its attained service (GPUs x seconds run,
   as Tiresias' 2D-LAS) against ``las_thresholds_gpu_s``; a priority class
   outweighs every queue. In ``srpt`` mode the same thresholds bucket the
   *remaining* service instead: the estimated remaining run time times the
   job's GPUs (a pending job's ``est_duration_s``, a running job's
   ``est_end - now``; unknown: the last queue), so the jobs closest to their
   end rank highest and a waiting job preempts one at least a bucket further
   from its end (a true remaining time: the SRPT oracle; a predicted one:
   the simulator's ``srpt``). A running job's rank only rises as it runs.
   ``predictive`` mode mixes the two per job: a job whose estimate is
   *trusted* (``est_error``, how far off its family's past estimates were,
   at most ``max_est_error``) is ranked as in ``srpt``, any other as in
   ``las``, both against the same thresholds, so that it is ``las`` until
   estimates earn trust and ``srpt`` once all do.
2. **Quotas.** ``quotas[team]`` GPUs are the team's own. A job that keeps its
   team within quota goes before jobs of its rank that would borrow; a
   borrowing job starts only on idle GPUs (other teams' unused quota is lent),
   and a job within quota takes borrowed GPUs back by preemption (reclaim). A
   team without an entry borrows everything it holds. No quotas: no borrowing.
3. **Fair share.** Among jobs of one rank, the team with the fewest GPUs per
   unit of ``weights[team]`` (default 1) goes next, counting the GPUs it holds
   and those of its jobs already ordered.
4. **Within a team:** ``fifo`` by submit time; ``sjf`` by estimated remaining
   run time (``est_duration_s``; unknown last), then submit time; ``las``,
   ``srpt`` and ``predictive`` within a queue the same way (by submit time
   when, as usual, no job has an estimate; in ``predictive`` mode an
   untrusted estimate counts as none).
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
:func:`place_plan` (leaving out, until their victims are gone,
the jobs in ``victims_of``), store ``reasons`` as the pending reasons, and
come back no later than ``next_change_at``.

>>> job = QueuedJob("j1", "ml", 0, gpus=2, submitted_at=0.0)
>>> p = plan([job], running=[], node_gpus={"n1": 8}, policy=QueuePolicy(), now=5.0)
>>> p.order, p.preempt
(('j1',), ())

How, in this module: :class:`Capacity` is a private count model of GPUs per
node (it picks nodes as placement's ``pack`` does on equal GPUs, so the two
agree on the common case); :func:`plan` orders the queue by rules 1-4 and a
:class:`Walk` applies rules 5-6 over the count model; :func:`place_plan` then
hands the order to :func:`scheduler.core.placement.place`, fencing the
reservation's GPUs and giving each preemption's GPUs to the job it was for.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from scheduler.core.model import (
    RANK_STEP,
    ClusterSnapshot,
    Decision,
    Demand,
    Holding,
    PlacementPolicy,
    QueuedJob,
    QueuePlan,
    QueuePolicy,
    Reservation,
    RunningJob,
)
from scheduler.core.placement import FREE, build_nodes, place, with_placements

INF = math.inf


@dataclass(slots=True, eq=False)
class Held:
    """A running job, or one this pass lets start, in the count model.

    ``gpus`` is per node, one node per entry of ``node_ids``; ``est_end`` is
    ``inf`` when unknown; ``victim`` says whether it may be preempted now
    (preemptible and past the policy's ``min_run_s``).
    """

    job_id: str
    team: str
    gpus: int
    node_ids: tuple[str, ...]
    rank: int
    started_at: float
    est_end: float
    victim: bool

    @property
    def total_gpus(self) -> int:
        return self.gpus * len(self.node_ids)


@dataclass(frozen=True, slots=True)
class Hold:
    """Where the head of the queue will start: ``start_at`` on ``node_ids``.

    ``spare`` is, per reserved node, the GPUs free at ``start_at`` beyond what
    the head needs there: what jobs that may outlast ``start_at`` can still use.
    """

    start_at: float
    node_ids: tuple[str, ...]
    spare: dict[str, int]


_Option = tuple[tuple[int, int, float, str], str, list[Held]]
"""A node's way to make room: (sort key, node, victims); see :meth:`Capacity.victims_for`."""


class Capacity:
    """Free GPUs per node, the jobs holding the rest, and GPUs per team."""

    def __init__(self, node_gpus: Mapping[str, int], running: Iterable[Held]) -> None:
        self.cap = {n: max(0, int(g)) for n, g in node_gpus.items()}
        self.free = dict(self.cap)
        self.on_node: dict[str, list[Held]] = {n: [] for n in self.cap}
        self.usage: dict[str, int] = {}
        self.version = 0  # bumped on every change, for the caller's "no fit" memo
        self.largest = max(self.cap.values(), default=0)
        self._by_free: dict[int, set[str]] | None = None  # nodes per free count, from fit()
        self._by_rank: dict[str, list[Held]] = {}  # per node, as victims_for() takes them
        # per node, victims_for()'s answers by (GPUs, rank below) while the node is unchanged
        self._options: dict[str, dict[tuple[int, float], _Option | None]] = {}
        for h in running:
            self.add(h)

    def _set_free(self, n: str, free: int) -> None:
        by_free = self._by_free
        if by_free is not None:
            names = by_free[self.free[n]]
            names.discard(n)
            if not names:
                del by_free[self.free[n]]
            by_free.setdefault(free, set()).add(n)
        self.free[n] = free

    def add(self, h: Held) -> None:
        """Count ``h``'s GPUs as held (on nodes this model knows; the team's total always)."""
        for n in h.node_ids:
            if n in self.free:
                self._set_free(n, self.free[n] - h.gpus)
                self.on_node[n].append(h)
                self._by_rank.pop(n, None)
                self._options.pop(n, None)
        self.usage[h.team] = self.usage.get(h.team, 0) + h.total_gpus
        self.version += 1

    def remove(self, h: Held) -> None:
        """Give ``h``'s GPUs back (a preemption)."""
        for n in h.node_ids:
            if n in self.free:
                self._set_free(n, self.free[n] + h.gpus)
                self.on_node[n].remove(h)
                self._by_rank.pop(n, None)
                self._options.pop(n, None)
        self.usage[h.team] -= h.total_gpus
        self.version += 1

    def max_free(self) -> int:
        return max(self.free.values(), default=0)

    def fit(self, gpus: int, nodes: int, limit: Mapping[str, int] | None = None) -> tuple[str, ...]:
        """The ``nodes`` best-fit nodes with ``gpus`` free each (``()`` if none).

        ``limit`` caps what may be used on some nodes (a reservation's spare GPUs).
        """
        # Placement sees only the usable GPUs: best fit among those.
        fitting: list[tuple[int, str]] = []
        limit = limit or {}
        for n, most in limit.items():
            free = self.free.get(n)
            if free is not None and min(free, most) >= gpus:
                fitting.append((min(free, most) - gpus, n))
        by_free = self._by_free
        if by_free is None:
            by_free = self._by_free = {}
            for n, free in self.free.items():
                by_free.setdefault(free, set()).add(n)
        found = 0  # the other nodes, fullest first, until there are enough
        for free in sorted(by_free):
            if free < gpus:
                continue
            names = [n for n in by_free[free] if n not in limit]
            fitting.extend((free - gpus, n) for n in (sorted(names) if nodes > 1 else names))
            found += len(names)
            if found >= nodes:
                break
        if len(fitting) < nodes:
            return ()
        if nodes == 1:
            return (min(fitting)[1],)
        return tuple(sorted(n for _, n in sorted(fitting)[:nodes]))

    def _option(
        self,
        n: str,
        gpus: int,
        eligible: Callable[[Held, Mapping[str, int]], bool] | None,
        rank_below: float,
    ) -> _Option | None:
        """What making room for ``gpus`` on node ``n`` takes (see :meth:`victims_for`)."""
        free = self.free[n]
        taken: list[Held] = []
        taken_gpus, worst, recent = 0, -(2**62), 0.0  # recent larger: less work at stake
        if free < gpus:
            removed: dict[str, int] = {}  # GPUs taken from each team so far
            candidates = self._by_rank.get(n)
            if candidates is None:
                candidates = self._by_rank[n] = sorted(
                    self.on_node[n], key=lambda h: (h.rank, -h.started_at, h.job_id)
                )
            for h in candidates:
                if free >= gpus or h.rank >= rank_below:
                    break
                if h.victim if eligible is None else eligible(h, removed):
                    taken.append(h)
                    free += h.gpus
                    removed[h.team] = removed.get(h.team, 0) + h.total_gpus
                    taken_gpus += h.gpus
                    worst = max(worst, h.rank)
                    recent += h.started_at * h.gpus
            if free < gpus:
                return None
        return ((taken_gpus, worst, -recent, n), n, taken)

    def victims_for(
        self,
        gpus: int,
        nodes: int,
        eligible: Callable[[Held, Mapping[str, int]], bool] | None,
        allowed: Callable[[str], bool],
        rank_below: float = INF,
    ) -> tuple[tuple[str, ...], list[Held]] | None:
        """Nodes and the running jobs to preempt there so that ``gpus`` fit on ``nodes`` nodes.

        ``eligible(job, removed)`` says whether a job may be a victim, given the
        GPUs already taken from each team on that node; no job of rank
        ``rank_below`` or higher is. ``eligible=None``: every job that may be a
        victim (``Held.victim``) below ``rank_below`` is; each node's answer is
        then kept until the node changes.
        Per node, victims are taken lowest rank first, then the most recently
        started (the least work at stake); nodes are chosen by the fewest GPUs
        preempted (a gang's node is costly to get back), then by the highest
        rank they must preempt, then the latest starts. None when no set of
        eligible victims on allowed nodes makes room.
        """
        options: list[_Option] = []
        for n in self.free:
            if self.cap[n] < gpus or not allowed(n):
                continue
            if eligible is None:
                kept, key = self._options.setdefault(n, {}), (gpus, rank_below)
                if key in kept:
                    option = kept[key]
                else:
                    option = kept[key] = self._option(n, gpus, None, rank_below)
            else:
                option = self._option(n, gpus, eligible, rank_below)
            if option is not None:
                options.append(option)
        if len(options) < nodes:
            return None
        chosen = heapq.nsmallest(nodes, options, key=lambda o: o[0])
        victims: dict[str, Held] = {}
        for _, _, taken in chosen:
            for h in taken:
                victims[h.job_id] = h
        return tuple(sorted(n for _, n, _ in chosen)), list(victims.values())

    def hold_for(self, gpus: int, nodes: int, now: float) -> Hold | None:
        """The earliest start of a ``gpus`` x ``nodes`` job from the held jobs' estimated ends.

        ``start_at`` is ``inf`` when it needs jobs without an estimate to end.
        None when fewer than ``nodes`` nodes have ``gpus`` GPUs at all.
        """
        ready: list[tuple[float, int, str]] = []
        for n, free in self.free.items():
            if self.cap[n] < gpus:
                continue
            at = now if free >= gpus else INF
            if free < gpus:
                for h in sorted(self.on_node[n], key=lambda h: h.est_end):
                    free += h.gpus
                    if free >= gpus:
                        at = max(now, h.est_end)
                        break
            ready.append((at, -self.free[n], n))
        if len(ready) < nodes:
            return None
        ready.sort()
        chosen = ready[:nodes]
        start_at = max(at for at, _, _ in chosen)
        spare = {
            n: self.free[n] + sum(h.gpus for h in self.on_node[n] if h.est_end <= start_at) - gpus
            for _, _, n in chosen
        }
        return Hold(start_at, tuple(sorted(spare)), spare)


# -- rules 5-6: one walk over the ordered queue ------------------------------


def las_queue(attained_gpu_s: float, thresholds: Sequence[float]) -> int:
    """The LAS queue index (0 = highest) for a job's attained service.

    >>> las_queue(100.0, (3600.0, 36000.0)), las_queue(3600.0, (3600.0, 36000.0))
    (0, 1)
    """
    return bisect.bisect_right(thresholds, attained_gpu_s)


def srpt_queue(remaining_s: float | None, gpus: int, thresholds: Sequence[float]) -> int:
    """The ``srpt`` queue index (0 = highest) for a job's remaining GPU-seconds (None: unknown).

    >>> srpt_queue(100.0, 4, (3600.0,)), srpt_queue(1000.0, 4, (3600.0,)), srpt_queue(None, 1, ())
    (0, 1, 0)
    """
    if remaining_s is None:
        return len(thresholds)
    return bisect.bisect_right(thresholds, remaining_s * max(1, gpus))


def trusted(est_s: float | None, est_error: float | None, policy: QueuePolicy) -> bool:
    """Whether the ``predictive`` mode ranks a job by its estimate (rule 1).

    >>> p = QueuePolicy(mode="predictive", max_est_error=0.5)
    >>> trusted(60.0, 0.2, p), trusted(60.0, 0.9, p), trusted(60.0, None, p), trusted(None, 0.1, p)
    (True, False, False, False)
    """
    return est_s is not None and est_error is not None and est_error <= policy.max_est_error


def predictive_queue(
    est_s: float | None,
    est_error: float | None,
    attained_gpu_s: float,
    gpus: int,
    policy: QueuePolicy,
) -> int:
    """The ``predictive`` queue index: ``srpt``'s on a trusted estimate, ``las``' otherwise.

    >>> p = QueuePolicy(mode="predictive", las_thresholds_gpu_s=(3600.0,), max_est_error=0.5)
    >>> predictive_queue(7200.0, 0.1, 0.0, 1, p), predictive_queue(7200.0, 0.9, 0.0, 1, p)
    (1, 0)
    """
    thresholds = policy.las_thresholds_gpu_s
    if not trusted(est_s, est_error, policy):
        return las_queue(attained_gpu_s, thresholds)
    return srpt_queue(est_s, gpus, thresholds)


def held_of(r: RunningJob, policy: QueuePolicy, now: float) -> Held:
    """A running job in the count model, ranked as rule 1 says (running jobs do not age)."""
    run_s = max(0.0, now - r.started_at)
    gpus = r.gpus * len(r.node_ids)
    left_s = None if r.est_end is None else max(0.0, r.est_end - now)
    mode, thresholds = policy.mode, policy.las_thresholds_gpu_s
    queue = 0
    attained = r.attained_gpu_s + run_s * gpus
    if mode == "srpt":
        queue = srpt_queue(INF if left_s is None else left_s, gpus, thresholds)
    elif mode == "las":
        queue = las_queue(attained, thresholds)
    elif mode == "predictive":
        queue = predictive_queue(left_s, r.est_error, attained, gpus, policy)
    return Held(
        r.job_id,
        r.team,
        r.gpus,
        r.node_ids,
        r.priority * RANK_STEP - queue,
        r.started_at,
        INF if r.est_end is None else r.est_end,
        r.preemptible and run_s >= policy.min_run_s,
    )


def _needs(gpus: int, nodes: int) -> str:
    where = "one node" if nodes == 1 else f"each of {nodes} nodes"
    return f"needs {gpus} GPU{'s' if gpus != 1 else ''} on {where}"


def _at(t: float) -> str:
    return "an unknown time (running jobs have no estimated end)" if t == INF else f"t={t:.0f}"


class _Reasons(Mapping[str, str]):
    """Reasons written during the walk, plus those of the unvisited tail, written when read."""

    def __init__(
        self,
        written: dict[str, str],
        tail: Sequence[tuple[QueuedJob, int]],
        text: Callable[[QueuedJob], str],
    ) -> None:
        self._written, self._tail, self._text = written, tail, text
        self._index: dict[str, QueuedJob] | None = None

    def __getitem__(self, job_id: str) -> str:
        text = self._written.get(job_id)
        if text is not None:
            return text
        if self._index is None:
            self._index = {job.job_id: job for job, _ in self._tail}
        return self._text(self._index[job_id])

    def __iter__(self) -> Iterator[str]:
        yield from self._written
        for job, _ in self._tail:
            yield job.job_id

    def __len__(self) -> int:
        return len(self._written) + len(self._tail)


class Walk:
    """Rules 5-6 (module docstring) over an ordered queue; read the fields after :meth:`run`."""

    def __init__(
        self,
        running: Sequence[RunningJob],
        node_gpus: Mapping[str, int],
        policy: QueuePolicy,
        now: float,
        node_labels: Mapping[str, str] | None = None,
    ) -> None:
        self.policy, self.running, self.node_gpus, self.now = policy, running, node_gpus, now
        self.node_labels = node_labels or {}
        self.cap = Capacity(node_gpus, (held_of(r, policy, now) for r in running))
        self.order: list[str] = []
        self.preempt: list[str] = []
        self.victims_of: dict[str, tuple[str, ...]] = {}
        self.keep_off: set[str] = set()
        self.written: dict[str, str] = {}
        self.reasons: Mapping[str, str] = self.written
        self.head: QueuedJob | None = None
        self.hold: Hold | None = None
        self.victim_rank = self._victim_rank()
        self._no_fit: dict[tuple[int, int, bool], int] = {}  # shape -> version it failed at
        # shape -> (version, the highest rank that found no victims then); without quotas
        # a job of that shape and no higher rank finds none either (fewer are eligible)
        self._no_victims: dict[tuple[int, int, bool], tuple[int, int]] = {}
        self._texts: dict[tuple[int, int, int], str] = {}
        self._full_at = (-1, False)  # (capacity version, no GPU free then)

    def run(self, queue: Sequence[tuple[QueuedJob, int]]) -> Walk:
        """Walk ``queue`` (ordered by rules 1-4, with ranks); returns self."""
        policy, now, written = self.policy, self.now, self.written
        # Only a job without GPUs or a quota reclaim could start on a full cluster out of
        # rank order; without them the tail behind a full cluster can be skipped.
        may_skip = not policy.quotas and all(job.gpus > 0 for job, _ in queue)
        spare: dict[str, int] = {}
        for i, (job, rank) in enumerate(queue):
            if (
                may_skip
                and self.hold is not None
                and self._full()
                and (not policy.preemption or self.victim_rank is None or rank <= self.victim_rank)
            ):
                self.reasons = _Reasons(written, queue[i:], self._wait_text)
                break
            g, n = job.gpus, job.nodes
            hold = self.hold
            if hold is None:
                nodes = self._fit(g, n, None)
                if nodes:
                    self._admit(job, rank, nodes)
                elif not self._preempt(job, rank, None):
                    self._block(job, queue, i)
                    if self.hold is not None:
                        spare = dict(self.hold.spare)
                        if not policy.backfill:
                            break
                continue
            est = job.est_duration_s
            short = hold.start_at < INF and est is not None and now + est <= hold.start_at
            nodes = self._fit(g, n, None if short else spare)
            if nodes:
                self._admit(job, rank, nodes)
                if not short:
                    self.keep_off.add(job.job_id)
                    for nd in nodes:
                        if nd in spare:
                            spare[nd] -= g
            elif self._preempt(job, rank, spare):
                self.keep_off.add(job.job_id)
            elif not short and self._fit(g, n, None):
                head_id = self.head.job_id if self.head is not None else "?"
                written[job.job_id] = (
                    f"reservation: starting now would delay {head_id}'s reserved start at "
                    f"{_at(hold.start_at)}"
                )
            else:
                written[job.job_id] = self._wait_text(job)
        return self

    def _block(self, job: QueuedJob, queue: Sequence[tuple[QueuedJob, int]], i: int) -> None:
        """``job`` can start neither now nor by preemption: make it the head, if it ever fits."""
        g, n = job.gpus, job.nodes
        hold = self.cap.hold_for(g, n, self.now)
        if hold is None:
            largest = max(self.node_gpus.values(), default=0)
            self.written[job.job_id] = (
                f"capacity: {_needs(g, n)}; the cluster has too few such nodes "
                f"(the largest has {largest} GPUs)"
            )
            return
        self.head, self.hold = job, hold
        where = ", ".join(self.node_labels.get(n, n) for n in hold.node_ids)
        self.written[job.job_id] = (
            f"{self._wait_text(job)}; head of the queue, reserved to start at "
            f"{_at(hold.start_at)} on {where}"
        )
        if not self.policy.backfill:
            text = f"priority: waits behind {job.job_id} (strict order, no backfill)"
            self.reasons = _Reasons(self.written, queue[i + 1 :], lambda _: text)

    def _full(self) -> bool:
        """No GPU free anywhere (memoised per capacity version)."""
        version = self.cap.version
        if self._full_at[0] != version:
            self._full_at = (version, self.cap.max_free() <= 0)
        return self._full_at[1]

    def _fit(self, g: int, n: int, limit: Mapping[str, int] | None) -> tuple[str, ...]:
        key, version = (g, n, limit is None), self.cap.version
        if self._no_fit.get(key) == version:
            return ()
        nodes = self.cap.fit(g, n, limit) if g <= self.cap.largest else ()
        if not nodes:
            self._no_fit[key] = version
        return nodes

    def _admit(self, job: QueuedJob, rank: int, nodes: tuple[str, ...]) -> None:
        now = self.now
        est_end = INF if job.est_duration_s is None else now + job.est_duration_s
        self.cap.add(Held(job.job_id, job.team, job.gpus, nodes, rank, now, est_end, False))
        self.order.append(job.job_id)

    def _victim_rank(self) -> int | None:
        ranks = [h.rank for hs in self.cap.on_node.values() for h in hs if h.victim]
        return min(ranks) if ranks else None

    def _preempt(self, job: QueuedJob, rank: int, reserved: Mapping[str, int] | None) -> bool:
        """Rule 6: preempt for ``job`` and admit it, if some eligible victims make room.

        ``reserved``: the reservation's spare GPUs per node, when behind the head:
        victims are then taken off those nodes only.
        """
        policy, cap = self.policy, self.cap
        if not policy.preemption or self.victim_rank is None:
            return False
        quotas, team = policy.quotas, job.team
        within = bool(quotas) and cap.usage.get(team, 0) + job.total_gpus <= quotas.get(team, 0)
        if rank <= self.victim_rank and not within:
            return False

        def eligible(h: Held, removed: Mapping[str, int]) -> bool:
            if not h.victim:
                return False
            borrowing = cap.usage.get(h.team, 0) - removed.get(h.team, 0) > quotas.get(h.team, 0)
            if within and h.team != team and borrowing:
                return True
            return h.rank < rank and (not quotas or h.team == team or borrowing)

        key = (job.gpus, job.nodes, reserved is None)  # behind the head: its nodes are off
        failed = self._no_victims.get(key)
        if not quotas and failed is not None and failed[0] == cap.version and rank <= failed[1]:
            return False
        off = frozenset(reserved or ())
        # Without quotas: the jobs that may be victims below its rank, and no others.
        below = INF if quotas else rank
        check = eligible if quotas else None
        found = cap.victims_for(job.gpus, job.nodes, check, lambda n: n not in off, below)
        if found is None:
            if not quotas:
                if failed is not None and failed[0] == cap.version:
                    rank = max(rank, failed[1])
                self._no_victims[key] = (cap.version, rank)
            return False
        nodes, victims = found
        for h in victims:
            cap.remove(h)
            self.preempt.append(h.job_id)
        self.victims_of[job.job_id] = tuple(h.job_id for h in victims)
        self.victim_rank = self._victim_rank()
        # Where placement will put it once the victims are gone: the best fit now.
        self._admit(job, rank, cap.fit(job.gpus, job.nodes, reserved) or nodes)
        return True

    def _capacity_text(self, g: int, n: int) -> str:
        key = (g, n, self.cap.version)
        text = self._texts.get(key)
        if text is None:
            free = [max(0, f) for f in self.cap.free.values()]
            text = self._texts[key] = (
                f"{_needs(g, n)}; at most {max(free, default=0)} free on a node, {sum(free)} in all"
            )
        return text

    def _wait_text(self, job: QueuedJob) -> str:
        text = f"capacity: {self._capacity_text(job.gpus, job.nodes)}"
        quotas = self.policy.quotas
        if quotas:
            held, quota = self.cap.usage.get(job.team, 0), quotas.get(job.team, 0)
            if held + job.total_gpus > quota:
                return (
                    f"quota: {job.team} holds {held} of {quota} GPUs; beyond its quota a job "
                    f"only borrows idle GPUs ({text})"
                )
        return text

    def next_change(self, queue: Sequence[tuple[QueuedJob, int]]) -> float | None:
        """The earliest time a rank or a protection changes enough to matter, or None.

        Only changes that could let a waiting job preempt count: a running job
        falling to a queue below the best waiting rank, its protection running
        out, or a waiting job aging past the lowest running rank.
        """
        policy, now = self.policy, self.now
        if not policy.preemption:
            return None
        admitted = set(self.order)
        top = next((rank for job, rank in queue if job.job_id not in admitted), None)
        if top is None:
            return None
        reclaim = bool(policy.quotas)
        times: list[float] = []
        thresholds = policy.las_thresholds_gpu_s
        running = {r.job_id: r for r in self.running}
        seen: set[str] = set()
        for h in (h for hs in self.cap.on_node.values() for h in hs):
            r = running.get(h.job_id)
            if r is None or not r.preemptible or h.job_id in seen:
                continue  # admitted in this pass, or never preemptible
            seen.add(h.job_id)
            if not h.victim and (reclaim or h.rank < top):
                times.append(r.started_at + policy.min_run_s)  # its protection ends
            gpus = r.gpus * len(r.node_ids)
            if policy.mode in ("las", "predictive") and gpus > 0 and h.rank <= top:
                attained = r.attained_gpu_s + max(0.0, now - r.started_at) * gpus
                q = las_queue(attained, thresholds)
                if q < len(thresholds):
                    times.append(now + (thresholds[q] - attained) / gpus)
        aging, victim_rank = policy.aging_s_per_priority, self.victim_rank
        if aging is not None and victim_rank is not None:
            for job, rank in queue:
                if rank > victim_rank or job.job_id in admitted:
                    continue
                since = job.submitted_at if job.queued_at is None else job.queued_at
                steps_now = max(0, int((now - since) // aging))
                more = (victim_rank - rank) // RANK_STEP + 1
                times.append(since + (steps_now + more) * aging)
        later = [t for t in times if t > now]
        return min(later) if later else None


# -- rules 1-4 and the plan --------------------------------------------------


def _order(
    pending: Sequence[QueuedJob], policy: QueuePolicy, now: float, usage: Mapping[str, int]
) -> list[tuple[QueuedJob, int]]:
    """Pending jobs by rules 1-4, each with its rank."""
    aging, mode = policy.aging_s_per_priority, policy.mode
    thresholds = policy.las_thresholds_gpu_s
    keyed: list[tuple[int, float, float, str, int]] = []  # sorts as rules 1 and 4 say
    for i, job in enumerate(pending):
        level = job.priority
        if aging is not None:
            since = job.submitted_at if job.queued_at is None else job.queued_at
            steps = int((now - since) // aging)
            if steps > 0:
                level += steps
        rank = level * RANK_STEP
        if mode == "fifo":
            keyed.append((-rank, job.submitted_at, 0.0, job.job_id, i))
            continue
        est_s = job.est_duration_s
        if mode == "las":
            rank -= las_queue(job.attained_gpu_s, thresholds)
        elif mode == "srpt":
            rank -= srpt_queue(est_s, job.total_gpus, thresholds)
        elif mode == "predictive":
            rank -= predictive_queue(
                est_s, job.est_error, job.attained_gpu_s, job.total_gpus, policy
            )
            if not trusted(est_s, job.est_error, policy):
                est_s = None  # by submit time within its queue, as LAS
        est = INF if est_s is None else est_s
        keyed.append((-rank, est, job.submitted_at, job.job_id, i))
    quotas = policy.quotas
    if not quotas and len({job.team for job in pending}) <= 1:
        keyed.sort()
        return [(pending[k[4]], -k[0]) for k in keyed]
    levels: dict[int, dict[str, list[tuple[int, float, float, str, int]]]] = {}
    for k in keyed:
        teams = levels.get(-k[0])
        if teams is None:
            teams = levels[-k[0]] = {}
        team = pending[k[4]].team
        ks = teams.get(team)
        if ks is None:
            teams[team] = [k]
        else:
            ks.append(k)
    share = dict(usage)  # GPUs held plus GPUs of jobs ordered so far, per team
    weights = policy.weights
    out: list[tuple[QueuedJob, int]] = []
    for rank in sorted(levels, reverse=True):
        teams = levels[rank]
        for ks in teams.values():
            ks.sort(reverse=True)  # pop() gives the next by rule 4
        # Only the team that goes next changes its key: a heap of the teams' keys; while
        # that team's new key is still the smallest, heappushpop hands it back at once.
        heap = [(_team_key(t, ks[-1], pending, share, policy), t) for t, ks in teams.items()]
        heapq.heapify(heap)
        entry = heapq.heappop(heap)
        while True:
            team = entry[1]
            ks = teams[team]
            job = pending[ks.pop()[4]]
            out.append((job, rank))
            held = share[team] = share.get(team, 0) + job.gpus * job.nodes
            if ks:
                k = ks[-1]
                if quotas:
                    key = _team_key(team, k, pending, share, policy)
                else:  # _team_key without quotas: nobody borrows
                    key = (False, held / weights.get(team, 1.0), k)
                entry = heapq.heappushpop(heap, (key, team))
            elif heap:
                entry = heapq.heappop(heap)
            else:
                break
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
    node_labels: Mapping[str, str] | None = None,
) -> QueuePlan:
    """Order the queue and decide preemptions for one pass (rules in the module docstring).

    ``node_gpus``: the schedulable GPUs of each node. Running jobs on nodes not
    listed still count toward their team's quota. Every pending job is either
    in ``order`` or has a reason. ``node_labels`` names nodes in reasons, by node
    id (:func:`scheduler.core.placement.node_labels`; a node not in it: its id).
    """
    if math.isnan(now):
        raise ValueError("now must be a number")
    if len({j.job_id for j in pending}) != len(pending):
        raise ValueError("a job id appears twice among the pending jobs")
    usage: dict[str, int] = {}
    for r in running:
        usage[r.team] = usage.get(r.team, 0) + r.gpus * len(r.node_ids)
    queue = _order(pending, policy, now, usage)
    w = Walk(running, node_gpus, policy, now, node_labels).run(queue)
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
        ranked=tuple(job.job_id for job, _ in queue),
    )


# -- placing a plan ----------------------------------------------------------


RESERVED_PREFIX = "reserved-for:"
"""Job id prefix of the placeholder holdings that keep a reservation's GPUs free."""


def place_plan(
    snapshot: ClusterSnapshot,
    plan: QueuePlan,
    demands: Mapping[str, Demand],
    policy: PlacementPolicy,
) -> list[Decision]:
    """One decision per job of ``plan.order`` that has a demand, in plan order.

    ``snapshot`` still holds the GPUs of the jobs in ``plan.preempt``: each
    victim's holdings are dropped just before the job it was preempted for
    is placed, so the jobs placed before that one cannot take them. A caller
    whose victims take time to stop (the live loop) leaves their preemptors
    out of ``demands`` until they have; the simulator stops them at once.

    >>> from scheduler.core.queue_policy import QueuePlan
    >>> place_plan(ClusterSnapshot(nodes=()), QueuePlan((), (), {}), {}, PlacementPolicy())
    []
    """
    order = [j for j in plan.order if j in demands]
    keep_off, victims_of = plan.keep_off_reservation, plan.victims_of
    reservation = plan.reservation
    if not victims_of and (reservation is None or not keep_off):
        return place(snapshot, [demands[j] for j in order], policy)
    spare = {} if reservation is None else {n: max(0, g) for n, g in reservation.spare_gpus.items()}
    current = snapshot
    out: list[Decision] = []
    for batch_ids in _batches(order, keep_off, victims_of):
        victims = set(victims_of.get(batch_ids[0], ()))
        if victims:
            kept = tuple(h for h in current.holdings if h.job_id not in victims)
            current = ClusterSnapshot(current.nodes, kept)
        batch = [demands[j] for j in batch_ids]
        if reservation is not None and batch_ids[0] in keep_off:
            fence = _fence(current, reservation, spare, policy)
            decisions = place(
                ClusterSnapshot(current.nodes, current.holdings + fence), batch, policy
            )
            for d in decisions:
                for p in d.placement:
                    if p.node_id in spare:
                        spare[p.node_id] -= len(p.gpu_uuids)
        else:
            decisions = place(current, batch, policy)
        current = with_placements(current, batch, decisions)
        out.extend(decisions)
    return out


def _batches(
    order: list[str], keep_off: frozenset[str], victims_of: Mapping[str, tuple[str, ...]]
) -> list[list[str]]:
    """Runs of ``order`` placed by one ``place`` call: a preemptor or a change of fence ends one."""
    out: list[list[str]] = []
    for job_id in order:
        if out and job_id not in victims_of and (job_id in keep_off) == (out[-1][0] in keep_off):
            out[-1].append(job_id)
        else:
            out.append([job_id])
    return out


def _fence(
    snapshot: ClusterSnapshot,
    reservation: Reservation,
    spare: Mapping[str, int],
    policy: PlacementPolicy,
) -> tuple[Holding, ...]:
    """Placeholder holdings on the reserved nodes' free GPUs beyond their spare."""
    nodes = build_nodes(
        snapshot.nodes, snapshot.holdings, policy.memory_headroom_bytes, policy.max_util_pct
    )
    by_id = {n.node_id: n for n in nodes}
    out: list[Holding] = []
    for node_id in reservation.node_ids:
        node = by_id.get(node_id)
        if node is None:
            continue
        free = sorted((g for g in node.gpus if g.state == FREE), key=lambda g: g.index)
        fenced = free[: max(0, len(free) - max(0, spare.get(node_id, 0)))]
        if fenced:
            out.append(
                Holding(
                    RESERVED_PREFIX + reservation.job_id,
                    node_id,
                    tuple(g.uuid for g in fenced),
                    0,
                    0.0,
                    0,
                )
            )
    return tuple(out)
