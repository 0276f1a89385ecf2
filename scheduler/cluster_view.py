"""``GET /cluster`` and ``jobworker cluster``: nodes, GPUs, and the jobs on each."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from scheduler.demands import assigned_nodes
from scheduler.states import JobState
from scheduler.store import JobStore
from workers.telemetry import NodeReading


def cluster_table(nodes: Sequence[NodeReading], store: JobStore) -> dict[str, Any]:
    """Telemetry of every node, each GPU annotated with the jobs assigned to it."""
    on_gpu: dict[str, list[str]] = {}
    on_node: dict[str, list[str]] = {}
    for job in store.find([JobState.SCHEDULED, JobState.RUNNING]):
        if not job.assignment:
            continue
        for placed in assigned_nodes(job.assignment):
            on_node.setdefault(placed["node_id"], []).append(job.id)
            for uuid in placed["gpu_uuids"]:
                on_gpu.setdefault(uuid, []).append(job.id)
    out = []
    for node in nodes:
        entry = asdict(node)
        entry["jobs"] = on_node.get(node.node_id, [])
        for gpu in entry["gpus"]:
            gpu["jobs"] = on_gpu.get(gpu["uuid"], [])
        out.append(entry)
    return {"nodes": out}
