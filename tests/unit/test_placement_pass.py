"""The loop's placement pass from job records: snapshot, plan, placement (pure)."""

from __future__ import annotations

import dataclasses

import pytest

from scheduler.batch.demands import demand_of
from scheduler.batch.placement_pass import (
    Estimate,
    PendingInputs,
    plan_pass,
    queued_of,
    snapshot_of,
)
from scheduler.batch.store import JobRecord
from scheduler.core.gpu_memory import AutoGpuMemory
from scheduler.core.model import PlacementPolicy, QueuePolicy
from scheduler.core.predictor import Prediction
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
        snapshot,
        [queued_of(j, None) for j in ready],
        active,
        demands,
        {},
        QueuePolicy(),
        PlacementPolicy(),
        1000.0,
        never,
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
    queued = [queued_of(j, None) for j in ready]
    plan, decisions = plan_pass(
        snapshot, queued, active, demands, {}, policy, PlacementPolicy(), 1000.0, never
    )
    assert plan.victims_of == {"high": ("low",)}
    assert decisions == []


def estimate(remaining_s: float, error: float | None) -> Estimate:
    return Estimate(Prediction(600.0, 500.0, 900.0, 20.0, "team:t", 4, error=error), remaining_s)


AUTO_CONFIG = CONFIG.replace("gpu_memory_gb: 8", "gpu_memory_gb: auto")


def test_pending_inputs_keep_an_unchanged_jobs_entries_from_pass_to_pass() -> None:
    inputs = PendingInputs()
    job = record("a", 2, at=1.0)
    est = estimate(300.0, 0.1)
    queued, demand = inputs.queued(job, est), inputs.demand(job, None)
    again = dataclasses.replace(job)  # the same record read again at the next pass
    assert inputs.queued(again, estimate(300.0, 0.1)) is queued
    assert inputs.demand(again, None) is demand
    assert queued == queued_of(job, est) and demand == demand_of(job)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("queued_at", 50.0),
        ("attained_gpu_s", 7200.0),
        ("priority", 3),
        ("team", "other"),
        ("submitted_at", 9.0),
    ],
)
def test_a_changed_record_rebuilds_its_queue_entry(field: str, value: object) -> None:
    inputs = PendingInputs()
    job = record("a", 2, at=1.0)
    inputs.queued(job, None)
    changed = dataclasses.replace(job, **{field: value})
    assert inputs.queued(changed, None) == queued_of(changed, None)
    assert getattr(inputs.queued(changed, None), field) == value


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (None, estimate(300.0, 0.1)),
        (estimate(300.0, 0.1), None),
        (estimate(300.0, 0.1), estimate(120.0, 0.1)),
        (estimate(300.0, 0.1), estimate(300.0, 0.5)),
        (estimate(300.0, 0.1), estimate(300.0, None)),
    ],
)
def test_a_changed_estimate_rebuilds_the_queue_entry(
    before: Estimate | None, after: Estimate | None
) -> None:
    inputs = PendingInputs()
    job = record("a", 2, at=1.0)
    inputs.queued(job, before)
    assert inputs.queued(job, after) == queued_of(job, after)


def test_a_changed_auto_request_rebuilds_the_demand() -> None:
    inputs = PendingInputs()
    job = pending_record(AUTO_CONFIG.format(gpus=1, priority=0), "a", submitted_at=1.0)
    small, large = AutoGpuMemory(10.0, "sized"), AutoGpuMemory(30.0, "sized")
    assert inputs.demand(job, small) == demand_of(job, small)
    assert inputs.demand(job, large) == demand_of(job, large)
    assert inputs.demand(job, None) == demand_of(job, None)
    assert demand_of(job, small) != demand_of(job, large)


def test_pending_inputs_forget_jobs_no_longer_pending() -> None:
    inputs = PendingInputs()
    a, b = record("a", 1, at=1.0), record("b", 1, at=2.0)
    qa, qb = inputs.queued(a, None), inputs.queued(b, None)
    da = inputs.demand(a, None)
    inputs.keep({"b"})
    assert inputs.queued(b, None) is qb
    assert inputs.queued(a, None) is not qa and inputs.demand(a, None) is not da
