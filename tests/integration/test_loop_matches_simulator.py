"""The live loop's planning path and the trace simulator give one workload the same schedule.

The same small trace runs twice under the simulator's ``ours`` policy (LAS + backfill +
preemption) on two simulated 4-GPU nodes: once through ``scheduler.sim.simulator``, and
once through the live reconcile loop (``scheduler.batch.loop.Scheduler``) over a real
job store (on SQLite, and on PostgreSQL), its clock driven from event to event. Only the
workers are simulated on the live side, by an executor that runs each job for its trace
duration (keeping its work across preemptions, as the simulator does with continuous
checkpoints and free restarts). Every job must start first, end and be preempted at
the same times in both: the live loop hands the queue policy what the simulator does
(attained service, queue entry time, start of the current attempt).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from scheduler import db
from scheduler.batch.loop import ACTIVE, LoopSettings, Scheduler
from scheduler.batch.store import JobStore
from scheduler.core.states import TERMINAL, JobState
from scheduler.sim.policies import POLICIES
from scheduler.sim.simulator import (
    CPUS_PER_GPU,
    HOST_MEMORY_PER_GPU_BYTES,
    TEAM,
    SimConfig,
    make_nodes,
    shape,
    simulate,
)
from scheduler.sim.traces import TraceJob
from workers.interface.executor import LaunchRequest, WorkerPhase, WorkerReport
from workers.interface.spec import load_spec
from workers.interface.telemetry import GIB, NodeReading

CONFIG = SimConfig(gpus=8, gpus_per_node=4, checkpoint_every_s=0.0, restart_s=0.0)
TRACE = [  # (job, submit s, run s, GPUs); distinct submit times (ties break by job id)
    TraceJob("a", 0.0, 5000.0, 4, 16 * GIB, "vc"),
    TraceJob("b", 100.0, 3000.0, 4, 24 * GIB, "vc"),
    TraceJob("c", 200.0, 2000.0, 2, 8 * GIB, "vc"),
    TraceJob("d", 300.0, 400.0, 1, 8 * GIB, "vc"),
    TraceJob("e", 400.0, 1500.0, 3, 40 * GIB, "vc"),
    TraceJob("f", 2500.0, 300.0, 1, 16 * GIB, "vc"),
    TraceJob("g", 2600.0, 1000.0, 4, 24 * GIB, "vc"),
    TraceJob("h", 3000.0, 500.0, 8, 24 * GIB, "vc"),  # a gang: 4 GPUs on each of 2 nodes
]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class _Run:
    duration_s: float
    done_s: float = 0.0  # work kept from earlier attempts (continuous checkpoints)
    started_at: float | None = None
    stopped: bool = False


class TraceExecutor:
    """The Executor protocol over simulated time: a job runs for its trace duration."""

    def __init__(self, clock: Clock, durations: Mapping[str, float]) -> None:
        self._clock = clock
        self._durations = durations  # by job name
        self._runs: dict[str, _Run] = {}

    def launch(self, request: LaunchRequest) -> None:
        run = self._runs.setdefault(request.job_id, _Run(self._durations[request.spec.name]))
        if request.rank == 0:
            run.started_at, run.stopped = self._clock(), False

    def poll(
        self, job_ids: Sequence[str], world_sizes: Mapping[str, int] | None = None
    ) -> dict[str, WorkerReport]:
        return {job_id: self._report(job_id) for job_id in job_ids}

    def _report(self, job_id: str) -> WorkerReport:
        run = self._runs.get(job_id)
        if run is None or run.started_at is None:
            return WorkerReport(job_id, WorkerPhase.LOST, error="no worker")
        if run.stopped:
            return WorkerReport(job_id, WorkerPhase.STOPPED, pid=1)
        if self._clock() >= self.ends_at(job_id):
            return WorkerReport(job_id, WorkerPhase.SUCCEEDED, pid=1)
        return WorkerReport(job_id, WorkerPhase.RUNNING, pid=1)

    def ends_at(self, job_id: str) -> float:
        run = self._runs[job_id]
        if run.started_at is None or run.stopped:
            return math.inf
        return run.started_at + run.duration_s - run.done_s

    def next_end(self) -> float:
        return min((self.ends_at(j) for j in self._runs), default=math.inf)

    def stop(self, job_id: str, grace_s: float) -> None:
        run = self._runs[job_id]
        if run.started_at is not None and not run.stopped:
            run.done_s += self._clock() - run.started_at
            run.stopped = True

    def release(self, job_id: str) -> None:
        run = self._runs.get(job_id)
        if run is not None:
            run.started_at = None

    def active(self) -> set[str]:
        return {j for j, r in self._runs.items() if r.started_at is not None}


class SimulatedNodes:
    def __init__(self, nodes: tuple[NodeReading, ...]) -> None:
        self._nodes = nodes

    def nodes(self, fresh: bool = False) -> tuple[NodeReading, ...]:
        return self._nodes


def _config(job: TraceJob) -> str:
    per_node, nodes = shape(job.gpus, CONFIG.gpus_per_node)
    return (
        f"name: {job.job_id}\nteam: {TEAM}\nentrypoint: tests.integration.user_code:explode\n"
        "train: {max_steps: 1}\n"
        f"resources: {{gpus: {per_node}, nodes: {nodes}, "
        f"gpu_memory_gb: {job.gpu_memory_bytes // GIB}, "
        f"cpus: {int(CPUS_PER_GPU * per_node)}, "
        f"memory_gb: {HOST_MEMORY_PER_GPU_BYTES * per_node // GIB}}}\n"
    )


def _live(store_url: str, tmp_path: Path) -> dict[str, tuple[float, float, int]]:
    """Run the trace through the live loop; per job (first start, end, preemptions)."""
    clock = Clock()
    engine = db.connect(store_url)
    store = JobStore(engine, clock=clock)
    executor = TraceExecutor(clock, {t.job_id: t.duration_s for t in TRACE})
    settings = LoopSettings(
        tracking_uri="unused", log_dir=tmp_path / "logs", queue=POLICIES["ours"].queue
    )
    loop = Scheduler(store, executor, SimulatedNodes(make_nodes(CONFIG)), settings, clock)
    arrivals = sorted(TRACE, key=lambda t: t.submit_s)

    def states() -> list[tuple[str, JobState, str | None]]:
        return sorted((j.id, j.state, j.preempt_reason) for j in store.find())

    while arrivals or store.find([JobState.PENDING, *ACTIVE]):
        while arrivals and arrivals[0].submit_s <= clock.now:
            text = _config(arrivals.pop(0))
            store.create(load_spec(text), text)
        for _ in range(10):  # passes at one instant until nothing changes (a preemption: 3)
            before = states()
            loop.run_once()
            if states() == before:
                break
        else:
            pytest.fail(f"the loop never settled at t={clock.now}")
        upcoming = [executor.next_end(), loop.next_change_at or math.inf]
        if arrivals:
            upcoming.append(arrivals[0].submit_s)
        later = min(t for t in upcoming if t > clock.now) if max(upcoming) > clock.now else None
        if later is None or math.isinf(later):
            break
        clock.now = later
    jobs = store.find()
    engine.dispose()
    assert all(j.state in TERMINAL for j in jobs), [(j.name, j.state) for j in jobs]
    nan = math.nan
    return {
        j.name: (
            nan if j.started_at is None else j.started_at,
            nan if j.finished_at is None else j.finished_at,
            j.preemptions,
        )
        for j in jobs
    }


def test_live_loop_and_simulator_schedule_a_trace_alike(store_url: str, tmp_path: Path) -> None:
    result = simulate(TRACE, "ours", CONFIG)
    assert result.skipped == result.unfinished == 0
    simulated = {j.job_id: (j.first_start_s, j.end_s, j.preemptions) for j in result.jobs}
    assert sum(p for _, _, p in simulated.values()) > 0, "the trace must exercise preemption"
    live = _live(store_url, tmp_path)
    order = sorted(simulated, key=lambda j: (simulated[j][0], j))
    assert sorted(live, key=lambda j: (live[j][0], j)) == order
    assert live == simulated  # the same event times: both sum the same whole seconds
