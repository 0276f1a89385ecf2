"""Trace-driven, event-driven cluster simulator over the real queue policy and placement.

Events are arrivals, ends, and the policy's own ``next_change_at`` (a queue
demotion, aging, a protection running out). After the events of one instant
the simulator calls :func:`scheduler.core.queue_policy.plan` on the pending and
running jobs, stops the jobs it preempts, and places the jobs it lets start
with :func:`scheduler.core.queue_policy.place_plan`, i.e. with
:func:`scheduler.core.placement.place` on a :class:`~scheduler.core.placement.ClusterSnapshot`
of simulated nodes (8 x A100 80 GB each by default) and the holdings of the
running jobs: the code the live loop runs.

A job runs for its trace duration. A job of up to ``gpus_per_node`` GPUs is a
gang on one node; a larger one spreads evenly over the fewest nodes (16 GPUs:
2 nodes x 8). A preempted job keeps its work up to its last checkpoint (one
every ``checkpoint_every_s`` of progress; 0 means continuous) and pays
``restart_s`` when it runs again.

Figures: JCT = end - submit (average and p99, nearest rank); queueing delay =
all time spent pending (before the first start and after each preemption);
makespan = last end - first submit; GPU utilization = GPU-seconds held /
(GPUs x makespan); ``useful_util`` counts only the trace's GPU-seconds (no
lost work, no restarts).

>>> from scheduler.sim.traces import TraceJob
>>> r = simulate([TraceJob("a", 0.0, 100.0, 1, 2**30, "vc")], "fifo", SimConfig(gpus=8))
>>> r.avg_jct_s, r.makespan_s
(100.0, 100.0)
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from scheduler.core.model import (
    ClusterSnapshot,
    Demand,
    Holding,
    NodePlacement,
    PlacementPolicy,
    QueuedJob,
    RunningJob,
)
from scheduler.core.queue_policy import place_plan, plan
from scheduler.sim.policies import POLICIES, SimPolicy
from scheduler.sim.preemption_cost import CHECKPOINT_EVERY_S, RESTART_S, saved_progress_s
from scheduler.sim.traces import TraceJob
from workers.interface.telemetry import GIB, GpuReading, GpuUuid, NodeId, NodeReading

GPU_NAME = "NVIDIA A100-SXM4-80GB"
GPU_MEMORY_BYTES = 80 * GIB
CPUS_PER_GPU = 8.0
HOST_MEMORY_PER_GPU_BYTES = 64 * GIB
TEAM = "trace"  # the trace has no teams: one team, no quotas


@dataclass(frozen=True, slots=True)
class SimConfig:
    """The simulated cluster and the cost of a preemption.

    >>> SimConfig().gpus // SimConfig().gpus_per_node
    6
    """

    gpus: int = 48
    gpus_per_node: int = 8
    checkpoint_every_s: float = CHECKPOINT_EVERY_S
    restart_s: float = RESTART_S


@dataclass(frozen=True, slots=True)
class JobResult:
    """What happened to one job."""

    job_id: str
    gpus: int
    submit_s: float
    first_start_s: float
    end_s: float
    duration_s: float
    queued_s: float
    preemptions: int


@dataclass(frozen=True, slots=True)
class SimResult:
    """The figures of one replay (see the module docstring); ``jobs`` holds per-job results."""

    policy: str
    avg_jct_s: float
    p99_jct_s: float
    avg_queue_s: float
    makespan_s: float
    gpu_util: float
    useful_util: float
    preemptions: int
    lost_gpu_s: float
    replay_s: float
    plan_calls: int
    skipped: int
    unfinished: int
    jobs: tuple[JobResult, ...]

    def figures(self) -> dict[str, float | int | str]:
        """The summary as a flat dict (what ``--json`` prints)."""
        return {
            "policy": self.policy,
            "jobs": len(self.jobs),
            "skipped": self.skipped,
            "unfinished": self.unfinished,
            "avg_jct_s": round(self.avg_jct_s, 1),
            "p99_jct_s": round(self.p99_jct_s, 1),
            "avg_queue_s": round(self.avg_queue_s, 1),
            "makespan_s": round(self.makespan_s, 1),
            "gpu_util": round(self.gpu_util, 4),
            "useful_util": round(self.useful_util, 4),
            "preemptions": self.preemptions,
            "lost_gpu_s": round(self.lost_gpu_s, 1),
            "replay_s": round(self.replay_s, 3),
            "plan_calls": self.plan_calls,
        }


def shape(gpus: int, gpus_per_node: int) -> tuple[int, int]:
    """(GPUs per node, nodes) for a job of ``gpus``: one node if it fits, else the fewest even.

    >>> shape(16, 8), shape(12, 8)
    ((8, 2), (6, 2))
    """
    if gpus <= gpus_per_node:
        return gpus, 1
    nodes = next(n for n in range(2, gpus + 1) if gpus % n == 0 and gpus // n <= gpus_per_node)
    return gpus // nodes, nodes


def make_nodes(config: SimConfig) -> tuple[NodeReading, ...]:
    """The simulated nodes: idle 80 GB GPUs; the last node has the remainder of ``gpus``."""
    if config.gpus < 1 or config.gpus_per_node < 1:
        raise ValueError("the cluster needs at least one GPU and one GPU per node")
    nodes = []
    for i, start in enumerate(range(0, config.gpus, config.gpus_per_node)):
        node_id = f"node-{i:02d}"
        count = min(config.gpus_per_node, config.gpus - start)
        gpus = tuple(
            GpuReading(
                index=k,
                uuid=GpuUuid(f"{node_id}-GPU-{k}"),
                name=GPU_NAME,
                memory_total_bytes=GPU_MEMORY_BYTES,
                memory_used_bytes=0,
                memory_free_bytes=GPU_MEMORY_BYTES,
                util_pct=0.0,
                memory_util_pct=0.0,
                temperature_c=None,
                power_w=None,
                mig_mode=False,
            )
            for k in range(count)
        )
        cpus = int(CPUS_PER_GPU * config.gpus_per_node) + 32
        memory = HOST_MEMORY_PER_GPU_BYTES * config.gpus_per_node * 2
        nodes.append(NodeReading(NodeId(node_id), node_id, cpus, memory, gpus, "simulated", 0.0))
    return tuple(nodes)


class _Job:
    """A job's mutable state during a replay."""

    __slots__ = (
        "attained_gpu_s",
        "demand",
        "end_s",
        "first_start_s",
        "holdings",
        "nodes",
        "per_node",
        "preemptions",
        "progress_s",
        "queued",
        "queued_at",
        "queued_s",
        "run_gen",
        "running",
        "started_at",
        "trace",
    )

    def __init__(self, trace: TraceJob, per_node: int, nodes: int) -> None:
        self.trace = trace
        self.per_node, self.nodes = per_node, nodes
        self.demand = Demand(
            trace.job_id,
            gpus=per_node,
            gpu_memory_bytes=trace.gpu_memory_bytes,
            cpus=CPUS_PER_GPU * per_node,
            memory_bytes=HOST_MEMORY_PER_GPU_BYTES * per_node,
            nodes=nodes,
        )
        self.progress_s = 0.0  # checkpointed work, in seconds of the trace duration
        self.attained_gpu_s = 0.0
        self.preemptions = 0
        self.queued_s = 0.0
        self.queued_at = trace.submit_s
        self.first_start_s = math.nan
        self.end_s = math.nan
        self.started_at = 0.0
        self.run_gen = 0
        self.holdings: tuple[Holding, ...] = ()
        self.queued: QueuedJob | None = None
        self.running: RunningJob | None = None

    def remaining_s(self, restart_s: float) -> float:
        """Run time left from the last checkpoint, restart included after a preemption."""
        return (self.trace.duration_s - self.progress_s) + (restart_s if self.preemptions else 0.0)


_ARRIVE, _END, _TICK = 0, 1, 2


class _Replay:
    """The event loop of one replay: the jobs' states, the event heap, the running totals."""

    def __init__(self, jobs: list[_Job], policy: SimPolicy, config: SimConfig) -> None:
        self.policy, self.config = policy, config
        self.nodes = make_nodes(config)
        self.node_gpus: dict[str, int] = {str(n.node_id): len(n.gpus) for n in self.nodes}
        self.placement = PlacementPolicy(strategy="pack")
        self.events: list[tuple[float, int, int, str, int]] = []
        self.seq = 0
        self.tick_gen = 0
        self.pending: dict[str, _Job] = {}
        self.running: dict[str, _Job] = {}
        self.by_id = {j.trace.job_id: j for j in jobs}
        self.plan_calls = 0
        self.held_gpu_s = 0.0
        self.lost_gpu_s = 0.0
        for j in jobs:
            self._push(j.trace.submit_s, _ARRIVE, j.trace.job_id, 0)

    def _push(self, at: float, kind: int, job_id: str, gen: int) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, kind, job_id, gen))

    def run(self) -> None:
        events = self.events
        while events:
            now = events[0][0]
            changed = False
            while events and events[0][0] == now:
                _, _, kind, job_id, gen = heapq.heappop(events)
                if kind == _ARRIVE:
                    self._enqueue(self.by_id[job_id], now)
                    changed = True
                elif kind == _END:
                    job = self.running.get(job_id)
                    if job is not None and job.run_gen == gen:
                        self._finish(job, now)
                        changed = True
                elif gen == self.tick_gen:  # only the latest plan's tick counts
                    changed = True
            if changed and self.pending:
                self._schedule(now)

    def _enqueue(self, job: _Job, now: float) -> None:
        job.queued_at = now
        est = self._estimate(job)
        job.queued = QueuedJob(
            job.trace.job_id,
            TEAM,
            0,
            job.per_node,
            job.trace.submit_s,
            nodes=job.nodes,
            attained_gpu_s=job.attained_gpu_s,
            est_duration_s=est,
            queued_at=now,
        )
        self.pending[job.trace.job_id] = job

    def _estimate(self, job: _Job) -> float | None:
        """The remaining run time the policy may know (see ``SimPolicy.estimates``)."""
        if self.policy.estimates == "oracle":
            return job.remaining_s(self.config.restart_s)
        return None

    def _schedule(self, now: float) -> None:
        self.plan_calls += 1
        qp = plan(
            [j.queued for j in self.pending.values() if j.queued is not None],
            [j.running for j in self.running.values() if j.running is not None],
            self.node_gpus,
            self.policy.queue,
            now,
        )
        if qp.order:
            snapshot = ClusterSnapshot(
                self.nodes, tuple(h for j in self.running.values() for h in j.holdings)
            )
            demands = {job_id: self.pending[job_id].demand for job_id in qp.order}
            decisions = place_plan(snapshot, qp, demands, self.placement)
        else:
            decisions = []
        for job_id in qp.preempt:
            self._preempt(self.running[job_id], now)
        for decision in decisions:
            if decision.placed:
                self._start(self.pending[decision.job_id], decision.placement, now)
        if qp.next_change_at is not None:
            self.tick_gen += 1
            self._push(qp.next_change_at, _TICK, "", self.tick_gen)

    def _start(self, job: _Job, places: tuple[NodePlacement, ...], now: float) -> None:
        del self.pending[job.trace.job_id]
        job.queued_s += now - job.queued_at
        if math.isnan(job.first_start_s):
            job.first_start_s = now
        job.started_at = now
        job.run_gen += 1
        d = job.demand
        job.holdings = tuple(
            Holding(d.job_id, p.node_id, p.gpu_uuids, d.gpu_memory_bytes, d.cpus, d.memory_bytes)
            for p in places
        )
        remaining = job.remaining_s(self.config.restart_s)
        est = self._estimate(job)
        job.running = RunningJob(
            d.job_id,
            TEAM,
            0,
            job.per_node,
            tuple(p.node_id for p in places),
            now,
            attained_gpu_s=job.attained_gpu_s,
            est_end=None if est is None else now + est,
        )
        self.running[d.job_id] = job
        self._push(now + remaining, _END, d.job_id, job.run_gen)

    def _stop(self, job: _Job, now: float) -> float:
        """Take ``job`` off its GPUs; returns the seconds of this run."""
        del self.running[job.trace.job_id]
        ran_s = now - job.started_at
        gpus = job.per_node * job.nodes
        self.held_gpu_s += ran_s * gpus
        job.attained_gpu_s += ran_s * gpus
        job.holdings, job.running = (), None
        return ran_s

    def _finish(self, job: _Job, now: float) -> None:
        self._stop(job, now)
        job.progress_s = job.trace.duration_s
        job.end_s = now

    def _preempt(self, job: _Job, now: float) -> None:
        ran_s = self._stop(job, now)
        restart = self.config.restart_s if job.preemptions else 0.0
        done = min(job.trace.duration_s, job.progress_s + max(0.0, ran_s - restart))
        saved = saved_progress_s(job.progress_s, done, self.config.checkpoint_every_s)
        self.lost_gpu_s += (ran_s - (saved - job.progress_s)) * job.per_node * job.nodes
        job.progress_s = saved
        job.preemptions += 1
        job.run_gen += 1  # its end event is void
        self._enqueue(job, now)


def simulate(
    trace: Sequence[TraceJob],
    policy: str | SimPolicy,
    config: SimConfig | None = None,
    timer: Callable[[], float] = time.perf_counter,
) -> SimResult:
    """Replay ``trace`` under ``policy`` (a SimPolicy or a name of ``sim.policies.POLICIES``).

    Jobs that could never fit the cluster (too few nodes for their shape,
    more memory than a GPU has) are left out and
    counted in ``skipped``;
    so are jobs still pending when nothing is left to happen (``unfinished``).
    ``replay_s`` is the wall time of the replay, by ``timer``.
    """
    config = config or SimConfig()
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; expected one of {', '.join(POLICIES)}")
        policy = POLICIES[policy]
    began = timer()
    node_sizes = [len(n.gpus) for n in make_nodes(config)]
    usable = GPU_MEMORY_BYTES - PlacementPolicy().memory_headroom_bytes
    jobs: list[_Job] = []
    skipped = 0
    for t in trace:
        per_node, nodes = shape(t.gpus, config.gpus_per_node)
        if sum(size >= per_node for size in node_sizes) < nodes or t.gpu_memory_bytes > usable:
            skipped += 1
            continue
        jobs.append(_Job(t, per_node, nodes))
    replay = _Replay(jobs, policy, config)
    replay.run()
    replay_s = timer() - began
    return _result(policy.name, jobs, replay, config, replay_s, skipped)


def _result(
    name: str, jobs: list[_Job], replay: _Replay, config: SimConfig, replay_s: float, skipped: int
) -> SimResult:
    done = [j for j in jobs if not math.isnan(j.end_s)]
    results = tuple(
        JobResult(
            j.trace.job_id,
            j.per_node * j.nodes,
            j.trace.submit_s,
            j.first_start_s,
            j.end_s,
            j.trace.duration_s,
            j.queued_s,
            j.preemptions,
        )
        for j in done
    )
    if not done:
        return SimResult(
            name, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0, 0.0, replay_s, 0, skipped, len(jobs), ()
        )
    jcts = sorted(j.end_s - j.trace.submit_s for j in done)
    makespan = max(j.end_s for j in done) - min(j.trace.submit_s for j in done)
    capacity = config.gpus * makespan
    useful = sum(j.trace.duration_s * j.per_node * j.nodes for j in done)
    return SimResult(
        policy=name,
        avg_jct_s=sum(jcts) / len(jcts),
        p99_jct_s=jcts[max(0, math.ceil(0.99 * len(jcts)) - 1)],
        avg_queue_s=sum(j.queued_s for j in done) / len(done),
        makespan_s=makespan,
        gpu_util=replay.held_gpu_s / capacity if capacity > 0 else 0.0,
        useful_util=useful / capacity if capacity > 0 else 0.0,
        preemptions=sum(j.preemptions for j in done),
        lost_gpu_s=replay.lost_gpu_s,
        replay_s=replay_s,
        plan_calls=replay.plan_calls,
        skipped=skipped,
        unfinished=len(jobs) - len(done),
        jobs=results,
    )
