"""One pass of the queue policy's backfill and preemption rules (internal to ``queue_policy``).

:class:`Walk` takes the queue already ordered by rank, quota, fair share and
mode, and walks it once over a private count model
(:class:`~scheduler.queue_capacity.Capacity`): admit what fits, preempt for
what may, reserve for the head, backfill behind it. Once no GPU is free and
no later job may preempt, the rest of the queue is not visited: its reasons
are written when read (:class:`_Reasons`), so a long queue behind a full
cluster costs one sort. Pure: ``now`` is an argument.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from scheduler.queue_capacity import INF, Capacity, Held, Hold

if TYPE_CHECKING:
    from scheduler.queue_policy import QueuedJob, QueuePolicy, RunningJob

RANK_STEP = 64
"""Rank units per priority level; LAS queues are single units below one level."""


def las_queue(attained_gpu_s: float, thresholds: Sequence[float]) -> int:
    """The LAS queue index (0 = highest) for a job's attained service.

    >>> las_queue(100.0, (3600.0, 36000.0)), las_queue(3600.0, (3600.0, 36000.0))
    (0, 1)
    """
    return bisect.bisect_right(thresholds, attained_gpu_s)


def held_of(r: RunningJob, policy: QueuePolicy, now: float) -> Held:
    """A running job in the count model, ranked as rule 1 says (running jobs do not age)."""
    run_s = max(0.0, now - r.started_at)
    queue = 0
    if policy.mode == "las":
        attained = r.attained_gpu_s + run_s * r.gpus * len(r.node_ids)
        queue = las_queue(attained, policy.las_thresholds_gpu_s)
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
    """Rules 5-6 of ``scheduler.queue_policy`` over an ordered queue; read the fields after run."""

    def __init__(
        self,
        running: Sequence[RunningJob],
        node_gpus: Mapping[str, int],
        policy: QueuePolicy,
        now: float,
    ) -> None:
        self.policy, self.running, self.node_gpus, self.now = policy, running, node_gpus, now
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
        self.written[job.job_id] = (
            f"{self._wait_text(job)}; head of the queue, reserved to start at "
            f"{_at(hold.start_at)} on {', '.join(hold.node_ids)}"
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

        off = frozenset(reserved or ())
        found = cap.victims_for(job.gpus, job.nodes, eligible, lambda n: n not in off)
        if found is None:
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
            if policy.mode == "las" and gpus > 0 and h.rank <= top:  # a demotion may expose it
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
