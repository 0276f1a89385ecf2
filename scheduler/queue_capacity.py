"""GPU counts per node, as the queue policy sees them (internal to ``scheduler.queue_policy``).

The queue policy decides *whether* a job may start now and *whom* to preempt;
placement (``scheduler.placement.place``) decides *where*, by memory, CPUs,
types and NVLink. To keep those two from disagreeing on the common case, this
count model chooses nodes the way placement's ``pack`` strategy does on equal
GPUs: the node left with the fewest free GPUs, ties by node id.

Pure: no I/O, no clock; ``now`` is an argument.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

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


class Capacity:
    """Free GPUs per node, the jobs holding the rest, and GPUs per team."""

    def __init__(self, node_gpus: Mapping[str, int], running: Iterable[Held]) -> None:
        self.cap = {n: max(0, int(g)) for n, g in node_gpus.items()}
        self.free = dict(self.cap)
        self.on_node: dict[str, list[Held]] = {n: [] for n in self.cap}
        self.usage: dict[str, int] = {}
        self.version = 0  # bumped on every change, for the caller's "no fit" memo
        self.largest = max(self.cap.values(), default=0)
        for h in running:
            self.add(h)

    def add(self, h: Held) -> None:
        """Count ``h``'s GPUs as held (on nodes this model knows; the team's total always)."""
        for n in h.node_ids:
            if n in self.free:
                self.free[n] -= h.gpus
                self.on_node[n].append(h)
        self.usage[h.team] = self.usage.get(h.team, 0) + h.total_gpus
        self.version += 1

    def remove(self, h: Held) -> None:
        """Give ``h``'s GPUs back (a preemption)."""
        for n in h.node_ids:
            if n in self.free:
                self.free[n] += h.gpus
                self.on_node[n].remove(h)
        self.usage[h.team] -= h.total_gpus
        self.version += 1

    def max_free(self) -> int:
        return max(self.free.values(), default=0)

    def fit(self, gpus: int, nodes: int, limit: Mapping[str, int] | None = None) -> tuple[str, ...]:
        """The ``nodes`` best-fit nodes with ``gpus`` free each (``()`` if none).

        ``limit`` caps what may be used on some nodes (a reservation's spare GPUs).
        """
        fitting: list[tuple[int, str]] = []
        for n, free in self.free.items():
            usable = free if limit is None or n not in limit else min(free, limit[n])
            if usable >= gpus:  # placement sees only the usable GPUs: best fit among those
                fitting.append((usable - gpus, n))
        if len(fitting) < nodes:
            return ()
        if nodes == 1:
            return (min(fitting)[1],)
        return tuple(sorted(n for _, n in sorted(fitting)[:nodes]))

    def victims_for(
        self,
        gpus: int,
        nodes: int,
        eligible: Callable[[Held, Mapping[str, int]], bool],
        allowed: Callable[[str], bool],
    ) -> tuple[tuple[str, ...], list[Held]] | None:
        """Nodes and the running jobs to preempt there so that ``gpus`` fit on ``nodes`` nodes.

        ``eligible(job, removed)`` says whether a job may be a victim, given the
        GPUs already taken from each team on that node.
        Per node, victims are taken lowest rank first, then the most recently
        started (the least work at stake); nodes are chosen by the fewest GPUs
        preempted (a gang's node is costly to get back), then by the highest
        rank they must preempt, then the latest starts. None when no set of
        eligible victims on allowed nodes makes room.
        """
        options: list[tuple[tuple[int, int, float, str], str, list[Held]]] = []
        for n, free in self.free.items():
            if self.cap[n] < gpus or not allowed(n):
                continue
            taken: list[Held] = []
            if free < gpus:
                removed: dict[str, int] = {}  # GPUs taken from each team so far
                candidates = sorted(
                    self.on_node[n], key=lambda h: (h.rank, -h.started_at, h.job_id)
                )
                for h in candidates:
                    if free >= gpus:
                        break
                    if eligible(h, removed):
                        taken.append(h)
                        free += h.gpus
                        removed[h.team] = removed.get(h.team, 0) + h.total_gpus
                if free < gpus:
                    continue
            worst = max((h.rank for h in taken), default=-(2**62))
            recent = sum(h.started_at * h.gpus for h in taken)  # larger: less work at stake
            options.append(((sum(h.gpus for h in taken), worst, -recent, n), n, taken))
        if len(options) < nodes:
            return None
        options.sort(key=lambda o: o[0])
        chosen = options[:nodes]
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
