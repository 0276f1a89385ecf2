"""The loop's placement pass from job records: snapshot, plan, placement (pure)."""

from __future__ import annotations

import dataclasses

from scheduler.batch.demands import demand_of
from scheduler.batch.placement_pass import plan_pass, snapshot_of
from scheduler.batch.store import JobRecord
from scheduler.core.model import PlacementPolicy, QueuePolicy
from scheduler.core.states import JobState
from tests.unit.job_records import pending_record
from tests.unit.placement_factories import _node, uuid
from workers.interface.executor import Assignment, NodeAssignment

CONFIG = """
name: t
model: {{name: mlp}}
train: {{max_steps: 10}}
priority: {priority}
resources: {{gpus: {gpus}, gpu_memory_gb: 8, cpus: 2, memory_gb: 4}}
"""


def record(job_id: str, gpus: int, priority: int = 0, at: float = 0.0) -> JobRecord:
    return pending_record(CONFIG.format(gpus=gpus, priority=priority), job_id, submitted_at=at)


def running(job_id: str, node_id: str, *indices: int, priority: int = 0) -> JobRecord:
    job = record(job_id, len(indices), priority)
    node = NodeAssignment(
        node_id=node_id,
        hostname=node_id,
        gpu_indices=indices,
        gpu_uuids=tuple(uuid(node_id, i) for i in indices),
    )
    return dataclasses.replace(
        job, state=JobState.RUNNING, assignment=Assignment(nodes=(node,)), attempt_started_at=0.0
    )


def never(job_id: str, what: str, exc: Exception) -> None:
    raise AssertionError(f"{job_id}: {what}: {exc}")


def test_the_pass_places_what_the_plan_lets_start_on_gpus_nobody_holds() -> None:
    nodes = (_node("n1", gpus=4),)
    active = [running("old", "n1", 0, 1)]
    ready = [record("a", 2, at=1.0), record("b", 2, at=2.0)]
    snapshot = snapshot_of(nodes, active, (), never)
    assert [h.job_id for h in snapshot.holdings] == ["old"]
    demands = {j.id: demand_of(j) for j in ready}
    plan, decisions = plan_pass(
        snapshot, ready, active, demands, {}, QueuePolicy(), PlacementPolicy(), 1000.0, never
    )
    assert plan.order == ("a",)
    assert [(d.job_id, d.placement[0].gpu_indices) for d in decisions] == [("a", (2, 3))]
    assert "b" in plan.reasons


def test_a_job_that_preempts_is_not_placed_until_its_victims_are_gone() -> None:
    nodes = (_node("n1", gpus=2),)
    active = [running("low", "n1", 0, 1, priority=0)]
    ready = [record("high", 2, priority=5, at=1.0)]
    snapshot = snapshot_of(nodes, active, (), never)
    demands = {j.id: demand_of(j) for j in ready}
    policy = QueuePolicy(min_run_s=0.0)
    plan, decisions = plan_pass(
        snapshot, ready, active, demands, {}, policy, PlacementPolicy(), 1000.0, never
    )
    assert plan.victims_of == {"high": ("low",)}
    assert decisions == []
