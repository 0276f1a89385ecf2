"""Which batch jobs to preempt so that a real-time replica fits. Pure, like placement.

The real-time lane outranks the batch lane: when a replica fits nowhere, the
cheapest set of running batch jobs whose capacity would make it fit is
stopped (they checkpoint and are requeued). Cheapest: lowest priority first,
and among equals the most recently started (the least work at risk).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from scheduler.core.model import ClusterSnapshot, Demand, PlacementPolicy
from scheduler.core.placement import place
from workers.interface.telemetry import GpuReading, NodeReading


def without_jobs(snapshot: ClusterSnapshot, job_ids: Sequence[str]) -> ClusterSnapshot:
    """The snapshot as it will be once ``job_ids`` have stopped.

    Their holdings go, and so does what their processes use on each GPU
    (added back to the GPU's free memory).

    >>> without_jobs(ClusterSnapshot(nodes=()), ["j1"])
    ClusterSnapshot(nodes=(), holdings=())
    """
    gone = set(job_ids)
    leaving = [h for h in snapshot.holdings if h.job_id in gone]
    pids = {(h.node_id, h.pid) for h in leaving if h.pid is not None}
    nodes = tuple(
        _free_pids(n, {pid for node_id, pid in pids if node_id == n.node_id})
        for n in snapshot.nodes
    )
    holdings = tuple(h for h in snapshot.holdings if h.job_id not in gone)
    return ClusterSnapshot(nodes=nodes, holdings=holdings)


def _free_pids(node: NodeReading, pids: set[int | None]) -> NodeReading:
    if not pids:
        return node
    return dataclasses.replace(node, gpus=tuple(_free_gpu(g, pids) for g in node.gpus))


def _free_gpu(gpu: GpuReading, pids: set[int | None]) -> GpuReading:
    freed = sum(p.used_memory_bytes or 0 for p in gpu.processes if p.pid in pids)
    if not freed:
        return gpu
    return dataclasses.replace(
        gpu,
        processes=tuple(p for p in gpu.processes if p.pid not in pids),
        memory_free_bytes=None if gpu.memory_free_bytes is None else gpu.memory_free_bytes + freed,
        memory_used_bytes=None if gpu.memory_used_bytes is None else gpu.memory_used_bytes - freed,
    )


def choose_victims(
    snapshot: ClusterSnapshot,
    demand: Demand,
    candidates: Sequence[str],
    policy: PlacementPolicy,
) -> tuple[str, ...] | None:
    """The fewest of ``candidates`` (cheapest first) whose stopping lets ``demand`` fit.

    None when even stopping all of them would not make room.
    """
    chosen: list[str] = []
    for job_id in candidates:
        chosen.append(job_id)
        if _fits(without_jobs(snapshot, chosen), demand, policy):
            break
    else:
        return None
    # Drop any earlier pick that the later ones made unnecessary.
    for job_id in list(chosen[:-1]):
        rest = [j for j in chosen if j != job_id]
        if _fits(without_jobs(snapshot, rest), demand, policy):
            chosen = rest
    return tuple(chosen)


def _fits(snapshot: ClusterSnapshot, demand: Demand, policy: PlacementPolicy) -> bool:
    return place(snapshot, [demand], policy)[0].placed
