"""The cluster view placement works on, and the texts that explain its decisions.

:func:`build_nodes` turns a snapshot's telemetry and holdings into mutable
:class:`NodeState`/:class:`GpuState` objects that one placement pass consumes
(``scheduler.placement`` owns the search; :func:`pick_gpus` is its NVLink-aware
choice of GPUs on a node). :func:`node_reason` reads that view and writes one
line per node that a user can act on, for example::

    node-b: needs 2 GPUs with ≥ 40.0 GiB free; has 1 (GPU 3: 35.2 GiB free)
    node-a: needs 4 CPUs; 2 free
    node-c: no GPU of type H100 (has Tesla T4)

The predicates here are the ones placement decides by, so a text never
contradicts a decision. :func:`explain` and :func:`fragmentation` are public
through ``scheduler.placement``; the rest is internal to placement. Pure: no
I/O, no clock.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from workers.telemetry import GpuReading, GpuUuid, NodeReading

if TYPE_CHECKING:
    from scheduler.placement import ClusterSnapshot, Decision, Holding, PlacementPolicy

FREE = 0
"""GPU state: eligible and without holdings; any demand may take it."""
SHARED = 1
"""GPU state: eligible, holds only shared (real-time) replicas; shared demands only."""
TAKEN = 2
"""GPU state: held by an exclusive job."""
BLOCKED = 3
"""GPU state: not eligible at all in this pass (see the GPU's ``blocked`` text)."""

CPU_EPSILON = 1e-9
"""Slack for float CPU sums (``0.1 + 0.2``): never refuse a job for rounding."""

_GIB = float(2**30)


def gib(n_bytes: int) -> str:
    """Format bytes as GiB with one decimal: ``gib(40 * 2**30) == "40.0 GiB"``."""
    return f"{n_bytes / _GIB:.1f} GiB"


def num(value: float) -> str:
    """Format a CPU count or percentage without a useless ``.0``: ``num(4.0) == "4"``."""
    return f"{value:g}"


def type_alternatives(gpu_type: str | None) -> tuple[str, ...]:
    """Split ``"H100|A100"`` into lower-case alternatives; ``()`` means any type."""
    if gpu_type is None:
        return ()
    return tuple(alt.strip().lower() for alt in gpu_type.split("|") if alt.strip())


def type_matches(name_lower: str | None, alternatives: Sequence[str]) -> bool:
    """True when any alternative is a substring of the (lower-case) GPU name.

    No alternatives means "any type", which matches even an unknown name; an
    unknown name never matches a requested type.
    """
    if not alternatives:
        return True
    if name_lower is None:
        return False
    return any(alt in name_lower for alt in alternatives)


def _holders_text(holders: Sequence[str]) -> str:
    if not holders:
        return "another job"
    if len(holders) == 1:
        return holders[0]
    return f"{holders[0]} +{len(holders) - 1} more"


@dataclass(slots=True, eq=False)
class GpuState:
    """One GPU during a pass (mutable; lives only inside one ``place`` call).

    ``effective_free_bytes`` = measured free - headroom - memory assigned to
    holdings that NVML does not show yet - shared placements of this pass.
    """

    index: int
    uuid: GpuUuid
    name: str | None
    bit: int  # 1 << position on the node, for NVLink set masks
    name_lower: str | None = None
    effective_free_bytes: int = 0
    state: int = FREE
    blocked: str | None = None  # set iff state == BLOCKED
    holders: list[str] = field(default_factory=list)
    peer_mask: int = 0  # NVLink peers on this node, as bits
    held_note: str | None = None  # cached "held by"/"shared by" text; reset on change
    type_ok: dict[tuple[str, ...], bool] = field(default_factory=dict)  # memo of matches()
    free_note: str | None = None  # cached "N GiB free" text; reset on change

    def matches(self, alternatives: tuple[str, ...]) -> bool:
        """:func:`type_matches` for this GPU, memoised (names never change in a pass)."""
        ok = self.type_ok.get(alternatives)
        if ok is None:
            ok = self.type_ok[alternatives] = type_matches(self.name_lower, alternatives)
        return ok

    def held_text(self) -> str:
        """``"GPU 2: held by job-7"`` (or ``shared by``) for a GPU with holdings."""
        if self.held_note is None:
            verb = "held" if self.state == TAKEN else "shared"
            self.held_note = f"GPU {self.index}: {verb} by {_holders_text(self.holders)}"
        return self.held_note

    def free_text(self) -> str:
        """``"GPU 3: 35.2 GiB free"`` (effective free, never shown below 0)."""
        if self.free_note is None:
            self.free_note = f"GPU {self.index}: {gib(max(0, self.effective_free_bytes))} free"
        return self.free_note


@dataclass(slots=True, eq=False)
class NodeState:
    """One node during a pass, with summaries for cheap rejection (see :meth:`summarize`)."""

    node_id: str
    pos: int
    gpus: list[GpuState]
    cpus_free: float
    memory_free_bytes: int
    version: int = 0  # bumped on every placement onto this node
    n_free: int = 0  # GPUs in state FREE
    max_free: int = -1  # largest effective free among FREE GPUs
    free_asc: list[GpuState] = field(default_factory=list)  # FREE GPUs by (free, index)
    free_effs: list[int] = field(default_factory=list)  # their effective free, for bisect
    free_desc: list[GpuState] = field(default_factory=list)  # FREE GPUs by (-free, index)
    max_shareable: int = -1  # largest effective free among FREE or SHARED GPUs
    has_topology: bool = False  # some NVLink peers are known
    label: str = ""  # how reasons name the node: its hostname, unless hostnames repeat
    typed_gpus: dict[tuple[str, ...], list[GpuState]] = field(default_factory=dict)
    # (gpu memory, gpu type, shared) -> (version, usable GPUs, why-not text)
    reason_cache: dict[tuple[int, str | None, bool], tuple[int, int, str]] = field(
        default_factory=dict
    )

    def summarize(self) -> None:
        """Recompute the rejection summaries and free lists after the GPUs changed."""
        free = sorted(
            (g for g in self.gpus if g.state == FREE),
            key=lambda g: (g.effective_free_bytes, g.index),
        )
        self.free_asc = free
        self.free_effs = [g.effective_free_bytes for g in free]
        self.free_desc = sorted(free, key=lambda g: (-g.effective_free_bytes, g.index))
        self.n_free = len(free)
        self.max_free = self.free_effs[-1] if free else -1
        self.max_shareable = max(
            (g.effective_free_bytes for g in self.gpus if g.state <= SHARED), default=-1
        )

    def typed(self, alternatives: tuple[str, ...]) -> list[GpuState]:
        """This node's GPUs whose type matches ``alternatives`` (memoised; types never change)."""
        found = self.typed_gpus.get(alternatives)
        if found is None:
            found = [g for g in self.gpus if g.matches(alternatives)]
            self.typed_gpus[alternatives] = found
        return found


def _blocked_text(reading: GpuReading, ours: bool, max_util_pct: float) -> str | None:
    """Why a GPU is out for the whole pass; unknown values are never guessed."""
    i = reading.index
    if not reading.available:
        return f"GPU {i} unavailable"
    if reading.memory_free_bytes is None:
        return f"GPU {i}: free memory unknown"
    if reading.util_pct is None:
        return f"GPU {i}: utilization unknown"
    if reading.mig_mode:
        return f"GPU {i}: MIG mode on (MIG instances are not placed)"
    if reading.util_pct > max_util_pct and not ours:
        return f"GPU {i}: {num(reading.util_pct)}% busy (max {num(max_util_pct)}%)"
    return None


def _node_state(pos: int, reading: NodeReading, label: str) -> NodeState:
    gpus = [
        GpuState(r.index, r.uuid, r.name, 1 << i, None if r.name is None else r.name.lower())
        for i, r in enumerate(sorted(reading.gpus, key=lambda g: g.index))
    ]
    bit_of = {g.uuid: g.bit for g in gpus}
    for gpu, r in zip(gpus, sorted(reading.gpus, key=lambda g: g.index), strict=True):
        for peer in r.nvlink_peers:
            gpu.peer_mask |= bit_of.get(peer, 0) & ~gpu.bit
    for gpu in gpus:  # a link reported by one end counts for both
        for other in gpus:
            if other.peer_mask & gpu.bit:
                gpu.peer_mask |= other.bit
    return NodeState(
        reading.node_id,
        pos,
        gpus,
        float(reading.cpus),
        reading.memory_total_bytes,
        has_topology=any(g.peer_mask for g in gpus),
        label=label,
    )


def build_nodes(
    readings: Sequence[NodeReading],
    holdings: Sequence[Holding],
    memory_headroom_bytes: int,
    max_util_pct: float,
) -> list[NodeState]:
    """The per-pass view: nodes sorted by id, holdings' CPUs, memory and GPUs subtracted.

    A holding's unseen memory on a GPU is ``max(0, assigned - observed)``, where
    observed is its pid's usage there (0 when the pid is unknown, unlisted or
    its usage unknown: the safe side). Holdings on unknown nodes/GPUs are ignored.
    """
    ordered = sorted(readings, key=lambda n: n.node_id)
    hostnames = Counter(r.hostname for r in ordered)
    nodes = [
        _node_state(
            pos, r, r.hostname if hostnames[r.hostname] == 1 else f"{r.hostname}/{r.node_id[:8]}"
        )
        for pos, r in enumerate(ordered)
    ]
    by_id = {n.node_id: n for n in nodes}
    if len(by_id) != len(nodes):
        raise ValueError("cluster snapshot lists a node id twice")
    gpus = {(n.node_id, g.uuid): g for n in nodes for g in n.gpus}
    gpu_readings: dict[tuple[str, GpuUuid], GpuReading] = {
        (n.node_id, g.uuid): g for n in ordered for g in n.gpus
    }
    unseen: dict[tuple[str, GpuUuid], int] = {}
    exclusive: set[tuple[str, GpuUuid]] = set()
    for h in holdings:
        node = by_id.get(h.node_id)
        if node is None:  # its node left the cluster: nothing here to subtract
            continue
        node.cpus_free -= h.cpus
        node.memory_free_bytes -= h.memory_bytes
        for uuid in h.gpu_uuids:
            key = (node.node_id, uuid)
            if key not in gpus:
                continue
            gpus[key].holders.append(h.job_id)
            if not h.shared:
                exclusive.add(key)
            observed = sum(
                p.used_memory_bytes or 0 for p in gpu_readings[key].processes if p.pid == h.pid
            )
            unseen[key] = unseen.get(key, 0) + max(0, h.gpu_memory_bytes - observed)
    for key, gpu in gpus.items():
        reading = gpu_readings[key]
        gpu.blocked = _blocked_text(reading, bool(gpu.holders), max_util_pct)
        if gpu.blocked is not None or reading.memory_free_bytes is None:
            gpu.state = BLOCKED
        else:
            gpu.effective_free_bytes = (
                reading.memory_free_bytes - memory_headroom_bytes - unseen.get(key, 0)
            )
            gpu.state = TAKEN if key in exclusive else SHARED if gpu.holders else FREE
    for node in nodes:
        node.summarize()
    return nodes


_MAX_CLIQUE_TRIES = 256  # NVLink-set search budget per node; 8 GPUs need at most C(8,4) = 70


def _is_nvlink_set(gpus: Sequence[GpuState]) -> bool:
    mask = 0
    for g in gpus:
        mask |= g.bit
    return all((g.peer_mask | g.bit) & mask == mask for g in gpus)


def pick_gpus(node: NodeState, ranked: list[GpuState], k: int) -> tuple[tuple[GpuState, ...], int]:
    """The first ``k`` of ``ranked`` (best first), or the best all-NVLink set among them.

    Returns the GPUs and 0, or 1 when no all-NVLink set was found (or the
    node's topology is unknown): placement ranks such nodes after the others.
    """
    top = tuple(ranked[:k])
    if k == 1:
        return top, 0
    if not node.has_topology:
        return top, 1
    if _is_nvlink_set(top):
        return top, 0
    combos = itertools.combinations(ranked, k)  # lexicographic in preference order
    for combo in itertools.islice(combos, _MAX_CLIQUE_TRIES):
        if _is_nvlink_set(combo):
            return combo, 0
    return top, 1


class ShapeView(Protocol):
    """What the texts read of a demand's shape (the resources, not the job)."""

    gpus: int
    gpu_memory_bytes: int
    cpus: float
    memory_bytes: int
    gpu_type: str | None
    alternatives: tuple[str, ...]
    nodes: int
    shared: bool
    need_texts: tuple[str, str, str]  # see need_texts()


def gpu_blocker(gpu: GpuState, shape: ShapeView) -> str | None:
    """Why this GPU cannot take one GPU's share of ``shape``, or None if it can."""
    if gpu.blocked is not None:
        return gpu.blocked
    if shape.alternatives and not gpu.matches(shape.alternatives):
        if gpu.name is None:
            return f"GPU {gpu.index}: type unknown"
        return f"GPU {gpu.index}: {gpu.name}, not {shape.gpu_type}"
    if gpu.state == TAKEN or (gpu.state == SHARED and not shape.shared):
        return gpu.held_text()
    if gpu.effective_free_bytes < shape.gpu_memory_bytes:
        return gpu.free_text()
    return None


def _gpu_status(node: NodeState, shape: ShapeView) -> tuple[int, str]:
    """(usable GPUs, the why-not detail) for one GPU's share of ``shape``.

    Usable is -1 when no GPU has the type (the detail is then the whole
    clause). Memoised per node version, keyed by what the text depends on, so
    shapes that differ in GPU count, CPUs or host memory share one entry.
    """
    key = (shape.gpu_memory_bytes, shape.gpu_type, shape.shared)
    hit = node.reason_cache.get(key)
    if hit is not None and hit[0] == node.version:
        return hit[1], hit[2]
    if shape.alternatives and not node.typed(shape.alternatives):
        names = sorted({g.name or "unknown type" for g in node.gpus})
        usable, text = -1, f"no GPU of type {shape.gpu_type} (has {', '.join(names)})"
    else:
        blockers: list[str] = []
        for gpu in node.gpus:
            why = gpu_blocker(gpu, shape)
            if why is not None:
                blockers.append(why)
        usable = len(node.gpus) - len(blockers)
        text = f" ({', '.join(blockers)})" if blockers else ""
    node.reason_cache[key] = (node.version, usable, text)
    return usable, text


def need_texts(
    gpus: int, gpu_memory_bytes: int, cpus: float, memory_bytes: int, shared: bool
) -> tuple[str, str, str]:
    """The shape's half of its clauses (GPUs, CPUs, host memory), built once per shape."""
    plural = "GPU" if gpus == 1 else "GPUs"
    to_share = " to share" if shared else ""
    return (
        f"needs {gpus} {plural} with ≥ {gib(gpu_memory_bytes)} free{to_share}; has ",
        f"needs {num(cpus)} CPUs; ",
        f"needs {gib(memory_bytes)} host memory; ",
    )


def node_reason(node: NodeState, shape: ShapeView) -> str:
    """One line: ``"<node>: <what is missing>"``, or ``"<node>: fits"``, by the node's label.

    Clauses (GPUs, CPUs, host memory) are joined by ``"; "``; every number a
    user needs to act on is in the text. The node-side half of the GPU clause
    is memoised (see ``_gpu_status``), so this is mostly string joining.
    """
    gpu_need, cpu_need, memory_need = shape.need_texts
    clauses: list[str] = []
    if shape.gpus > 0:
        if not node.gpus:
            clauses.append(f"needs {shape.gpus} GPU{'' if shape.gpus == 1 else 's'}; has none")
        else:
            usable, detail = _gpu_status(node, shape)
            if usable < 0:
                clauses.append(detail)
            elif usable < shape.gpus:
                clauses.append(f"{gpu_need}{usable}{detail}")
    if node.cpus_free + CPU_EPSILON < shape.cpus:
        clauses.append(f"{cpu_need}{num(max(0.0, node.cpus_free))} free")
    if node.memory_free_bytes < shape.memory_bytes:
        clauses.append(f"{memory_need}{gib(max(0, node.memory_free_bytes))} free")
    if not clauses:
        return f"{node.label}: fits"
    return f"{node.label}: {'; '.join(clauses)}"


def gang_suffix(qualified: int, needed: int) -> str:
    """Appended to every node's line of an unplaced multi-node demand."""
    return f" ({qualified} of the {needed} nodes needed qualify)"


def explain(decision: Decision) -> str:
    """A multi-line, human-readable account of a decision (for the CLI and logs)."""
    if decision.placed:
        lines = [f"{decision.job_id}: placed"]
        for p in decision.placement:
            indices = ", ".join(str(i) for i in p.gpu_indices) or "none"
            lines.append(f"  {p.node_id}: GPUs {indices}")
        return "\n".join(lines)
    lines = [f"{decision.job_id}: not placed"]
    lines.extend(f"  {reason}" for reason in decision.reasons)
    return "\n".join(lines)


def fragmentation(snapshot: ClusterSnapshot, policy: PlacementPolicy) -> float:
    """Share of the free GPUs that are stranded on nodes which are not entirely free.

    A GPU is *free* when it is eligible under ``policy`` and has no holding. A
    node is *entirely free* when every one of its GPUs is free. Free GPUs on
    any other node can only serve jobs smaller than a whole node, so
    ``0.0`` = every free GPU sits on a whole free node (gangs fit),
    ``1.0`` = no whole node is left. ``0.0`` when nothing is free.
    """
    total = stranded = 0
    for node in build_nodes(
        snapshot.nodes, snapshot.holdings, policy.memory_headroom_bytes, policy.max_util_pct
    ):
        free = sum(1 for g in node.gpus if g.state == FREE)
        total += free
        if free < len(node.gpus):
            stranded += free
    return stranded / total if total else 0.0
