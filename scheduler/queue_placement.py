"""Place a :class:`~scheduler.queue_policy.QueuePlan` with :func:`scheduler.placement.place`.

The queue policy decides which jobs may start; placement decides where. The
one thing placement must be told is the head job's reservation: a job in
``plan.keep_off_reservation`` may use, on each reserved node, only the
reservation's spare GPUs. That is enforced by placing such jobs against a
snapshot in which the other free GPUs of the reserved nodes carry a
placeholder holding (``reserved-for:<head>``), so the reason texts of a job
refused there name the reservation. The other is whose GPUs a preemption
frees: the job it was for. Jobs are still placed in plan order: consecutive
runs of the order go to one ``place`` call each.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Mapping

from scheduler.placement import (
    ClusterSnapshot,
    Decision,
    Demand,
    Holding,
    PlacementPolicy,
    place,
    with_placements,
)
from scheduler.placement_reasons import FREE, build_nodes
from scheduler.queue_policy import QueuePlan, Reservation

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

    >>> from scheduler.queue_policy import QueuePlan
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
