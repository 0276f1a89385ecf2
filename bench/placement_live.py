"""The live pass's side of ``bench/placement.py``: job records, and passes as the loop runs them.

The loop keeps each pending job's demand and queue entry from one pass to the
next (``PendingInputs``), so a pass right after another rebuilds only what
changed. :func:`steady_passes` times both: the *cold* pass (a fresh cache:
every pending job's demand and queue entry built, as after a restart) and the
*steady* pass that follows it, after the changes a pass sees between two
passes (:func:`next_inputs`: the cold pass's placements started, some running
jobs finished, about 1% of the pending jobs new or back in the queue).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import random
import time
from collections import Counter

from scheduler.batch.demands import assignment_of
from scheduler.batch.placement_pass import PendingInputs, plan_pass, snapshot_of
from scheduler.batch.store import JobRecord
from scheduler.core.model import (
    ClusterSnapshot,
    Decision,
    Holding,
    PlacementPolicy,
    QueuePlan,
    QueuePolicy,
)
from scheduler.core.states import JobState
from workers.interface.executor import Assignment, NodeAssignment
from workers.interface.spec import TrainingSpec
from workers.interface.telemetry import GIB, NodeReading

# Per-GPU memory request classes (GiB) and their probabilities: small fine-tunes,
# mid-size CNN/BERT-large training, large batches / 1-3B models, 7B-class models.
MEMORY_CLASSES_GIB = [8, 16, 32, 64]
MEMORY_WEIGHTS = [0.35, 0.30, 0.20, 0.15]
NOW_S = 1_000_000.0  # the live pass's clock
TEAMS = ["vision", "nlp", "speech", "recsys", "research", "platform"]
TEAM_WEIGHTS = [0.30, 0.25, 0.15, 0.15, 0.10, 0.05]
PRIORITIES = [-1, 0, 1, 2]
PRIORITY_WEIGHTS = [0.15, 0.65, 0.15, 0.05]
# gpu_type requests and their probabilities (None: any type)
GPU_TYPES: list[str | None] = [None, "H100|A100", "H100", "A100", "V100", "T4"]
GPU_TYPE_WEIGHTS = [0.70, 0.10, 0.06, 0.06, 0.05, 0.03]
CPUS_PER_GPU = [4, 8, 12]
HOST_GIB_PER_GPU = [32, 64, 96]
CHANGED_SHARE = 0.01  # pending jobs new or back in the queue between two passes
FINISHED_SHARE = 0.02  # running jobs that ended between two passes


_SPECS: dict[tuple[int, float, int, float, str | None, int], TrainingSpec] = {}


def _spec(
    gpus: int, gpu_gb: float, cpus: int, host_gb: float, gpu_type: str | None, nodes: int
) -> TrainingSpec:
    """A validated training spec with these resources (one per shape, shared by records)."""
    key = (gpus, gpu_gb, cpus, host_gb, gpu_type, nodes)
    spec = _SPECS.get(key)
    if spec is None:
        resources: dict[str, object] = {
            "gpus": gpus,
            "gpu_memory_gb": gpu_gb,
            "cpus": cpus,
            "memory_gb": host_gb,
        }
        if gpu_type is not None:
            resources["gpu_type"] = gpu_type
        spec = _SPECS[key] = TrainingSpec.model_validate(
            {
                "name": "bench",
                "model": {"name": "mlp"},
                "train": {"max_steps": 10},
                "resources": {**resources, "nodes": nodes},
            }
        )
    return spec


def _record(
    job_id: str,
    spec: TrainingSpec,
    team: str,
    priority: int,
    submitted_at: float,
    assignment: Assignment | None = None,
) -> JobRecord:
    """A PENDING record, or a RUNNING one since ``submitted_at`` when it has an assignment."""
    running = assignment is not None
    return JobRecord(
        id=job_id,
        name=spec.name,
        experiment=spec.experiment,
        team=team,
        priority=priority,
        state=JobState.RUNNING if running else JobState.PENDING,
        spec=spec,
        source_text="",
        submitted_at=submitted_at,
        updated_at=submitted_at,
        started_at=submitted_at if running else None,
        finished_at=None,
        attempts=int(running),
        assignment=assignment,
        run_id=None,
        model_version=None,
        error=None,
        progress=None,
        pending_reasons=None,
        cancel_requested=False,
        not_before=None,
        preemptions=0,
        resume_reason=None,
        preempt_reason=None,
        queued_at=submitted_at,
        attempt_started_at=submitted_at if running else None,
        attained_gpu_s=0.0,
        losses=0,
        failures=0,
        lease_generation=None,
    )


def live_inputs(
    rng: random.Random, snapshot: ClusterSnapshot, sizes: Counter[int], n_jobs: int
) -> tuple[list[JobRecord], list[JobRecord], tuple[Holding, ...]]:
    """The live pass's inputs: active and pending job records, the replicas' holdings.

    Each exclusive holding of :func:`make_cluster` becomes a RUNNING record (its
    team and priority drawn as pending jobs' are, started 0-2 h before
    ``NOW_S``, so that some are still protected by ``min_run_s``); the shared
    ones stay the real-time lane's holdings.
    Pending: GPUs from the trace as :func:`make_jobs`; memory per GPU from
    ``MEMORY_CLASSES_GIB``; ``CPUS_PER_GPU`` and ``HOST_GIB_PER_GPU`` per GPU;
    ``GPU_TYPES``; ``TEAMS`` and ``PRIORITIES`` with their weights; submitted
    over the 90 minutes before ``NOW_S`` (so aging raises the older by one level).
    """
    hostnames: dict[str, str] = {n.node_id: n.hostname for n in snapshot.nodes}
    index = {g.uuid: g.index for n in snapshot.nodes for g in n.gpus}
    active: list[JobRecord] = []
    for h in snapshot.holdings:
        if h.shared:
            continue
        node = NodeAssignment(
            node_id=h.node_id,
            hostname=hostnames[h.node_id],
            gpu_indices=tuple(index[u] for u in h.gpu_uuids),
            gpu_uuids=h.gpu_uuids,
            pid=h.pid,
        )
        spec = _spec(1, h.gpu_memory_bytes / GIB, int(h.cpus), h.memory_bytes / GIB, None, 1)
        team = rng.choices(TEAMS, TEAM_WEIGHTS)[0]
        priority = rng.choices(PRIORITIES, PRIORITY_WEIGHTS)[0]
        started = NOW_S - rng.uniform(0, 7200)
        active.append(_record(h.job_id, spec, team, priority, started, Assignment(nodes=(node,))))
    replicas = tuple(h for h in snapshot.holdings if h.shared)
    values, counts = zip(*sorted(sizes.items()), strict=True)
    pending: list[JobRecord] = []
    for j, g in enumerate(rng.choices(values, counts, k=n_jobs)):
        nodes = max(1, math.ceil(g / 8))
        per_node = math.ceil(g / nodes)
        mem = rng.choices(MEMORY_CLASSES_GIB, MEMORY_WEIGHTS)[0]
        gpu_type = rng.choices(GPU_TYPES, GPU_TYPE_WEIGHTS)[0]
        cpus = rng.choice(CPUS_PER_GPU) * per_node
        host = rng.choice(HOST_GIB_PER_GPU) * per_node
        spec = _spec(per_node, float(mem), cpus, float(host), gpu_type, nodes)
        team = rng.choices(TEAMS, TEAM_WEIGHTS)[0]
        priority = rng.choices(PRIORITIES, PRIORITY_WEIGHTS)[0]
        submitted = NOW_S - 5400 + j * (5400 / n_jobs)
        pending.append(_record(f"pending-{j}", spec, team, priority, submitted))
    return active, pending, replicas


def _refuse(job_id: str, what: str, exc: Exception) -> None:
    raise RuntimeError(f"bench record {job_id}: {what}") from exc


def live_pass(
    nodes: tuple[NodeReading, ...],
    active: list[JobRecord],
    pending: list[JobRecord],
    replicas: tuple[Holding, ...],
    policy: PlacementPolicy,
    inputs: PendingInputs,
) -> tuple[QueuePlan, list[Decision]]:
    """One pass of the live loop, by the functions it calls (no store, no Ray)."""
    inputs.keep({j.id for j in pending})
    demands = {j.id: inputs.demand(j, None) for j in pending}
    queued = [inputs.queued(j, None) for j in pending]
    snapshot = snapshot_of(nodes, active, replicas, _refuse)
    return plan_pass(snapshot, queued, active, demands, {}, QueuePolicy(), policy, NOW_S, _refuse)


def next_inputs(
    rng: random.Random,
    nodes: tuple[NodeReading, ...],
    active: list[JobRecord],
    pending: list[JobRecord],
    decisions: list[Decision],
) -> tuple[list[JobRecord], list[JobRecord]]:
    """The active and pending records the next pass reads: the ``decisions`` placed
    now RUNNING, ``FINISHED_SHARE`` of the running jobs gone, and ``CHANGED_SHARE``
    of the pending ones changed: half of them new submissions (copies of others'
    specs), half back in the queue (a new ``queued_at`` and service, as after a
    preemption)."""
    by_node: dict[str, NodeReading] = {n.node_id: n for n in nodes}
    placed = {d.job_id: d for d in decisions if d.placed}
    started = [
        dataclasses.replace(
            j,
            state=JobState.RUNNING,
            assignment=assignment_of(placed[j.id], by_node),
            attempt_started_at=NOW_S,
        )
        for j in pending
        if j.id in placed
    ]
    n_finished = max(1, int(len(active) * FINISHED_SHARE))
    still = rng.sample(active, len(active) - n_finished)
    waiting = [j for j in pending if j.id not in placed]
    n_changed = max(2, int(len(waiting) * CHANGED_SHARE))
    changed = set(rng.sample(range(len(waiting)), n_changed // 2))
    waiting = [
        dataclasses.replace(j, queued_at=NOW_S, attained_gpu_s=j.attained_gpu_s + 3600.0)
        if i in changed
        else j
        for i, j in enumerate(waiting)
    ]
    new = [
        dataclasses.replace(j, id=f"new-{i}", submitted_at=at, queued_at=at, updated_at=at)
        for i, j in enumerate(rng.sample(waiting, n_changed - n_changed // 2))
        if (at := NOW_S - 1.0 + i * 1e-4)
    ]
    return [*still, *started], [*waiting, *new]


def steady_passes(
    rng: random.Random,
    nodes: tuple[NodeReading, ...],
    active: list[JobRecord],
    pending: list[JobRecord],
    replicas: tuple[Holding, ...],
    policy: PlacementPolicy,
    reps: int,
) -> tuple[list[float], list[float], list[float], int, tuple[QueuePlan, list[Decision]]]:
    """CPU ms of ``reps`` cold passes, CPU and wall ms of the steady pass after each
    (a warm-up pair first), how many jobs the cold pass placed, and the last steady
    pass's result."""
    _, decisions = live_pass(nodes, active, pending, replicas, policy, PendingInputs())
    after = next_inputs(rng, nodes, active, pending, decisions)
    cold: list[float] = []
    cpu: list[float] = []
    wall: list[float] = []
    result: tuple[QueuePlan, list[Decision]] | None = None
    for rep in range(reps + 1):
        inputs = PendingInputs()
        gc.collect()
        start_cpu = time.process_time()
        live_pass(nodes, active, pending, replicas, policy, inputs)
        cold_ms = (time.process_time() - start_cpu) * 1000
        gc.collect()
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        result = live_pass(nodes, *after, replicas, policy, inputs)
        if rep:  # the first pair warms up
            cold.append(cold_ms)
            cpu.append((time.process_time() - start_cpu) * 1000)
            wall.append((time.perf_counter() - start_wall) * 1000)
    assert result is not None
    return cold, cpu, wall, sum(d.placed for d in decisions), result
