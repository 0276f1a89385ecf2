"""The batch lane makes room for a replica on what the GPUs hold now, not on a stale sample.

A batch job that was preempted for a replica has stopped, but the node agent's last
sample (taken every 2 s) may still show its memory. A replica that asks again in that
window must not cost a second victim: the loop decides on telemetry sampled now. The
job store is real (SQLite and PostgreSQL); the cluster's two telemetry samples and the
real-time lane are stand-ins that show exactly that window.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from scheduler import db
from scheduler.batch.loop import LoopSettings, Scheduler
from scheduler.batch.store import JobStore
from scheduler.core.model import ClusterSnapshot, Demand, Holding, PlacementPolicy
from scheduler.core.states import JobState
from tests.unit.placement_factories import _gpu, _node, uuid
from workers.interface.executor import (
    Assignment,
    LaunchRequest,
    NodeAssignment,
    WorkerPhase,
    WorkerReport,
)
from workers.interface.spec import load_spec
from workers.interface.telemetry import GIB, GpuProcess, NodeReading

HIGH = (
    "name: high\npriority: 10\nentrypoint: tests.integration.user_code:run_until_stopped\n"
    "train: {max_steps: 1}\nresources: {gpus: 1, gpu_memory_gb: 30, cpus: 1, memory_gb: 1}\n"
)
HIGH_PID, GONE_PID = 100, 200


class TwoSamples:
    """GPU 0 holds the running job; GPU 1 is free now, but the last sample still shows the
    30 GiB of a job process that has just exited."""

    def nodes(self, fresh: bool = False) -> tuple[NodeReading, ...]:
        held = (GpuProcess(HIGH_PID, 30 * GIB),)
        gone = () if fresh else (GpuProcess(GONE_PID, 30 * GIB),)
        return (
            _node(
                "node-a",
                gpus=[
                    _gpu(0, total_gib=40, free_gib=10, processes=held),
                    _gpu(1, total_gib=40, free_gib=40 if fresh else 10, processes=gone),
                ],
            ),
        )


class Workers:
    """Reports every job running; records which ones were asked to stop."""

    def __init__(self) -> None:
        self.stopped: list[str] = []

    def launch(self, request: LaunchRequest) -> None:
        raise AssertionError("nothing is placed in this test")

    def poll(
        self, job_ids: Sequence[str], world_sizes: Mapping[str, int] | None = None
    ) -> dict[str, WorkerReport]:
        return {j: WorkerReport(j, WorkerPhase.RUNNING, pid=HIGH_PID) for j in job_ids}

    def stop(self, job_id: str, grace_s: float) -> None:
        self.stopped.append(job_id)

    def release(self, job_id: str) -> None:
        pass

    def active(self) -> set[str]:
        return set()


class OneReplica:
    """A real-time lane whose one replica (20 GiB of a GPU) fits nowhere in the pass's view."""

    def __init__(self) -> None:
        self.answers: list[str | None] = []

    def holdings(self) -> tuple[Holding, ...]:
        return ()

    def reconcile(
        self,
        snapshot: Callable[[], ClusterSnapshot],
        policy: PlacementPolicy,
        preempt: Callable[[Demand], str | None],
    ) -> None:
        replica = Demand("replica-1", 1, 20 * GIB, 1.0, GIB, shared=True)
        self.answers.append(preempt(replica))


def test_a_replica_asking_again_while_telemetry_lags_costs_no_second_victim(
    store_url: str, tmp_path: Path
) -> None:
    engine = db.connect(store_url)
    store = JobStore(engine)
    job = store.create(load_spec(HIGH), HIGH)
    on_gpu0 = NodeAssignment(
        node_id="node-a", hostname="node-a", gpu_indices=(0,), gpu_uuids=(uuid("node-a", 0),)
    )
    store.transition(job.id, JobState.SCHEDULED, "placed", assignment=Assignment(nodes=(on_gpu0,)))
    workers, lane = Workers(), OneReplica()
    settings = LoopSettings(tracking_uri="unused", log_dir=tmp_path / "logs")
    loop = Scheduler(store, workers, TwoSamples(), settings, realtime=lane)

    loop.run_once()

    assert lane.answers == ["room was freed just now; it starts at the next pass"]
    assert workers.stopped == []  # without the fresh sample: ["<high>"], a needless victim
    high = store.get(job.id)
    engine.dispose()
    assert high.state is JobState.RUNNING and high.preempt_reason is None
