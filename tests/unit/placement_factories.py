"""Inputs for the placement tests: GPU readings, nodes, demands and holdings.

GPU uuids are ``"<node>-GPU-<index>"`` (see :func:`uuid`). The ``make_gpu``,
``make_node`` and ``make_demand`` fixtures (tests/unit/conftest.py) hand out
``_gpu``, ``_node`` and ``_demand``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

from scheduler.core.model import Decision, Demand, Holding, PlacementPolicy
from workers.interface.telemetry import GIB, GpuProcess, GpuReading, GpuUuid, NodeId, NodeReading

Strategy = Literal["pack", "spread"]
NO_HEADROOM = PlacementPolicy(memory_headroom_bytes=0)
A100 = "NVIDIA A100-SXM4-80GB"


def uuid(node_id: str, index: int) -> GpuUuid:
    """The uuid ``make_node`` gives GPU ``index`` of ``node_id``."""
    return GpuUuid(f"{node_id}-GPU-{index}")


def _gpu(
    index: int = 0,
    *,
    name: str | None = A100,
    total_gib: float = 80,
    free_gib: float | None = 80,
    util: float | None = 0.0,
    processes: tuple[GpuProcess, ...] = (),
    peers: tuple[int, ...] = (),
    available: bool = True,
    mig: bool | None = False,
) -> GpuReading:
    free = None if free_gib is None else int(free_gib * GIB)
    total = int(total_gib * GIB)
    return GpuReading(
        index=index,
        uuid=GpuUuid(f"GPU-{index}"),
        name=name,
        memory_total_bytes=total,
        memory_used_bytes=None if free is None else total - free,
        memory_free_bytes=free,
        util_pct=util,
        memory_util_pct=None,
        temperature_c=None,
        power_w=None,
        processes=processes,
        mig_mode=mig,
        nvlink_peers=tuple(GpuUuid(f"GPU-{p}") for p in peers),
        available=available,
    )


def _node(
    node_id: str = "node-a",
    *,
    gpus: int | Sequence[GpuReading] = 1,
    cpus: int = 64,
    memory_gib: int = 512,
) -> NodeReading:
    readings = [_gpu(i) for i in range(gpus)] if isinstance(gpus, int) else list(gpus)
    renamed = tuple(
        dataclasses.replace(
            g,
            uuid=uuid(node_id, g.index),
            nvlink_peers=tuple(uuid(node_id, int(p.split("-")[-1])) for p in g.nvlink_peers),
        )
        for g in readings
    )
    return NodeReading(NodeId(node_id), node_id, cpus, memory_gib * GIB, renamed, "simulated", 0.0)


def _demand(**kw: Any) -> Demand:
    base: dict[str, Any] = {
        "job_id": "job-1",
        "gpus": 1,
        "gpu_memory_bytes": 10 * GIB,
        "cpus": 4.0,
        "memory_bytes": 16 * GIB,
    }
    base.update(kw)
    if "gpu_gib" in base:
        base["gpu_memory_bytes"] = int(base.pop("gpu_gib") * GIB)
    return Demand(**base)


def hold(
    job: str, node: str, *gpus: int, gib: float = 8, shared: bool = False, **kw: Any
) -> Holding:
    """A holding of ``gpus`` (indices) on ``node``."""
    return Holding(
        job,
        node,
        tuple(uuid(node, i) for i in gpus),
        int(gib * GIB),
        kw.pop("cpus", 4.0),
        kw.pop("memory_bytes", 16 * GIB),
        shared=shared,
        **kw,
    )


def only(decisions: list[Decision]) -> Decision:
    assert len(decisions) == 1
    return decisions[0]
