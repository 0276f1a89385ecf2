"""Admission: could a demand ever be placed on the cluster's nodes, were they empty?

A job that no node could hold even with nothing else running (4 GPUs per node on
2-GPU nodes, 100 GiB on 80 GiB GPUs, more CPUs than any node has) would wait
forever; the job service refuses it at submit instead. The answer is placement's
own (:func:`scheduler.core.placement.place` on the nodes emptied: no holdings,
every GPU's memory free and idle), so it never contradicts what the loop would
decide. Pure.

Example::

    refusal = never_fits(snapshot.nodes, demand, PlacementPolicy())
    refusal.fields  # ("gpus",): 4 GPUs asked on nodes of 2
    refusal.reasons  # ("node-a: needs 4 GPUs with ≥ 1.0 GiB free; has 2", ...)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from scheduler.core.model import ClusterSnapshot, Demand, PlacementPolicy
from scheduler.core.placement import place
from workers.interface.telemetry import GpuReading, NodeReading


@dataclass(frozen=True)
class NeverFits:
    """Why a demand fits no node, ever.

    ``fields``: the demand's fields that each, asked for alone more modestly (one
    node, one GPU, no GPU memory, CPUs, host memory or type), would let it fit;
    empty when no single one would. ``reasons``: one line per node, as placement
    words them (the node's hostname first).
    """

    fields: tuple[str, ...]
    reasons: tuple[str, ...]


# Each field's modest value: what the demand asks with that field alone relaxed.
_RELAXED: tuple[tuple[str, dict[str, Any]], ...] = (
    ("nodes", {"nodes": 1}),
    ("gpus", {"gpus": 1}),
    ("gpu_memory_bytes", {"gpu_memory_bytes": 0}),
    ("gpu_type", {"gpu_type": None}),
    ("cpus", {"cpus": 0.0}),
    ("memory_bytes", {"memory_bytes": 0}),
)


def never_fits(
    nodes: Sequence[NodeReading], demand: Demand, policy: PlacementPolicy
) -> NeverFits | None:
    """None when ``demand`` would fit ``nodes`` emptied of every job (or no node has
    reported yet: nothing is known); else what keeps it off every node."""
    if not nodes:
        return None
    empty = ClusterSnapshot(tuple(_emptied(n) for n in nodes))
    (decision,) = place(empty, [demand], policy)
    if decision.placed:
        return None
    fields = tuple(
        name
        for name, change in _RELAXED
        if any(getattr(demand, k) != v for k, v in change.items())
        and place(empty, [dataclasses.replace(demand, **change)], policy)[0].placed
    )
    return NeverFits(fields, decision.reasons)


def _emptied(node: NodeReading) -> NodeReading:
    """``node`` with nothing running: every GPU idle, its memory free, and available
    (a GPU lost now may come back)."""
    return dataclasses.replace(node, gpus=tuple(_idle(g) for g in node.gpus))


def _idle(gpu: GpuReading) -> GpuReading:
    total = gpu.memory_total_bytes
    return dataclasses.replace(
        gpu,
        memory_used_bytes=None if total is None else 0,
        memory_free_bytes=total,
        util_pct=0.0,
        memory_util_pct=0.0,
        processes=(),
        available=True,
    )
