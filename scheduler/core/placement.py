"""Placement: (cluster snapshot, pending demands, policy) -> decisions with reasons.

Pure: no I/O, no clock, no randomness; equal inputs give equal outputs. The
live reconcile loop and the trace simulator call the same :func:`place`.

One pass works on a private, mutable copy of the cluster built once from the
snapshot (:func:`build_nodes`): per GPU the *effective free memory* (measured
free - headroom - memory the scheduler assigned that NVML does not show yet)
and a state (free, shared, taken, blocked); per node the free CPUs and host
memory. Demands are taken in the given order and each placement consumes
capacity for the later ones. Because a pass only ever consumes, a node that
cannot host a demand *shape* now cannot host it later in the pass; the search
leans on that:

* per shape, a heap of node candidates keyed by the strategy's score, kept
  current from a log of changed nodes (each node carries a version counter);
* a shape that fits nowhere is dead for the rest of the pass, and its per-node
  reason texts are memoised per node version, so once the cluster is full the
  remaining jobs of known shapes cost a dictionary lookup each.

An unplaced demand gets one line per node that a user can act on
(:func:`node_reason`), for example::

    node-b: needs 2 GPUs with ≥ 40.0 GiB free; has 1 (GPU 3: 35.2 GiB free)
    node-a: needs 4 CPUs; 2 free
    node-c: no GPU of type H100 (has Tesla T4)

The texts read the same state with the same predicates as the search, so a
text never contradicts a decision.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from scheduler.core.model import (
    ClusterSnapshot,
    Decision,
    Demand,
    Holding,
    NodePlacement,
    PlacementPolicy,
    type_alternatives,
)
from workers.interface.telemetry import GIB, GpuReading, GpuUuid, NodeReading

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


def gib(n_bytes: int) -> str:
    """Format bytes as GiB with one decimal: ``gib(40 * 2**30) == "40.0 GiB"``."""
    return f"{n_bytes / GIB:.1f} GiB"


def num(value: float) -> str:
    """Format a CPU count or percentage without a useless ``.0``: ``num(4.0) == "4"``."""
    return f"{value:g}"


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


_Key = tuple[float, float, float, str]
"""A node's score for a shape; smaller is better; the node id makes it unique."""
_Scored = tuple[_Key, tuple[GpuState, ...]]
"""A node's score for a shape and the GPUs it would get there."""
_Entry = tuple[_Key, int, int, tuple[GpuState, ...]]
"""A heap entry: (score, node position, node version when scored, chosen GPUs)."""
_GpuKey = tuple[int, int, tuple[str, ...], bool]
"""What the GPU half of a node's score depends on: GPUs, memory per GPU, types, shared."""
_LineKey = tuple[int, int, str | None, bool]
"""What a host-fitting node's reason line depends on: GPUs, memory per GPU, type, shared."""


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
    # _Shape.gpu_key -> (version, the GPU half of _Pass._score's answer)
    score_cache: dict[_GpuKey, tuple[int, _Scored | None]] = field(default_factory=dict)
    # _Shape.line_key -> (version, node_reason's line when the host fits)
    line_cache: dict[_LineKey, tuple[int, str]] = field(default_factory=dict)

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


@dataclass(slots=True, eq=False)
class _Shape:
    """A demand's resources without its job id, with its per-pass search memo."""

    gpus: int
    gpu_memory_bytes: int
    cpus: float
    memory_bytes: int
    gpu_type: str | None
    alternatives: tuple[str, ...]
    nodes: int
    shared: bool
    need_texts: tuple[str, str, str]
    gpu_key: _GpuKey
    line_key: _LineKey
    dead: bool = False  # fits on fewer than `nodes` nodes, for the rest of the pass
    heap: list[_Entry] = field(default_factory=list)
    seen: list[int] = field(default_factory=list)  # node versions the heap was scored at
    fits: list[bool] = field(default_factory=list)  # False once a node cannot host it
    log_pos: int = 0  # how much of the change log the heap has seen
    reason_texts: list[str] = field(default_factory=list)
    reason_fits: list[bool] = field(default_factory=list)
    reason_seen: list[int] = field(default_factory=list)
    reasons_log_pos: int = -1
    reasons: tuple[str, ...] | None = None
    reasons_at: int = -1  # change-log length when `reasons` was built


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


def node_labels(readings: Sequence[NodeReading]) -> dict[str, str]:
    """How reasons name each node, by node id: its hostname (what ``jobworker cluster``
    shows), or ``hostname/<id prefix>`` where hostnames repeat."""
    hostnames = Counter(r.hostname for r in readings)
    return {
        r.node_id: r.hostname if hostnames[r.hostname] == 1 else f"{r.hostname}/{r.node_id[:8]}"
        for r in readings
    }


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
    labels = node_labels(ordered)
    nodes = [_node_state(pos, r, labels[r.node_id]) for pos, r in enumerate(ordered)]
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


def gpu_blocker(gpu: GpuState, shape: _Shape) -> str | None:
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


def _gpu_status(node: NodeState, shape: _Shape) -> tuple[int, str]:
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


def node_reason(node: NodeState, shape: _Shape) -> str:
    """One line: ``"<node>: <what is missing>"``, or ``"<node>: fits"``, by the node's label.

    Clauses (GPUs, CPUs, host memory) are joined by ``"; "``; every number a
    user needs to act on is in the text. The node-side half of the GPU clause
    is memoised (see ``_gpu_status``), and so is the line of a node whose CPUs
    and host memory suffice, for the shapes that differ only in those.
    """
    host_fits = (
        node.cpus_free + CPU_EPSILON >= shape.cpus and node.memory_free_bytes >= shape.memory_bytes
    )
    if host_fits:
        hit = node.line_cache.get(shape.line_key)
        if hit is not None and hit[0] == node.version:
            return hit[1]
        line = _node_line(node, shape)
        node.line_cache[shape.line_key] = (node.version, line)
        return line
    return _node_line(node, shape)


def _node_line(node: NodeState, shape: _Shape) -> str:
    """:func:`node_reason`, unmemoised."""
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


def _decision(
    job_id: str, placement: tuple[NodePlacement, ...], reasons: tuple[str, ...]
) -> Decision:
    """``Decision(...)`` without the frozen-dataclass ``__init__`` (3x its speed).

    A pass makes one decision per pending job (10,000 in the bench), and the
    frozen ``__init__`` goes through ``object.__setattr__`` per field; Decision
    has no ``__post_init__``, so setting the slots directly is equivalent.
    """
    d = _new(Decision)
    _set_job_id(d, job_id)
    _set_placement(d, placement)
    _set_reasons(d, reasons)
    return d


_new = object.__new__
_set_job_id = Decision.__dict__["job_id"].__set__  # the slot descriptor
_set_placement = Decision.__dict__["placement"].__set__  # the slot descriptor
_set_reasons = Decision.__dict__["reasons"].__set__  # the slot descriptor


class _Pass:
    """One placement pass over a private copy of the cluster."""

    def __init__(self, snapshot: ClusterSnapshot, policy: PlacementPolicy) -> None:
        if policy.strategy not in ("pack", "spread"):
            raise ValueError(f"unknown placement strategy {policy.strategy!r}")
        self.nodes = build_nodes(
            snapshot.nodes, snapshot.holdings, policy.memory_headroom_bytes, policy.max_util_pct
        )
        self.pack = policy.strategy == "pack"
        self.log: list[int] = []  # positions of nodes changed, one entry per placement
        self.shapes: dict[tuple[int, int, float, int, str | None, int, bool], _Shape] = {}

    def decide(self, d: Demand) -> Decision:
        """Place one demand (consuming capacity) or explain per node why not."""
        key = (d.gpus, d.gpu_memory_bytes, d.cpus, d.memory_bytes, d.gpu_type, d.nodes, d.shared)
        shape = self.shapes.get(key)
        if shape is None:
            shape = self.shapes[key] = self._new_shape(d)
        elif self.pack and not shape.dead and shape.log_pos != len(self.log):
            self._refresh(shape)
        if not shape.dead:
            picked = self._pop_best(shape)
            if picked is not None:
                return _decision(d.job_id, self._commit(shape, picked, d.job_id), ())
            shape.dead = True
            shape.heap = []
        return _decision(d.job_id, (), self._reasons(shape))

    def _new_shape(self, d: Demand) -> _Shape:
        alternatives = type_alternatives(d.gpu_type)
        shape = _Shape(
            d.gpus,
            d.gpu_memory_bytes,
            d.cpus,
            d.memory_bytes,
            d.gpu_type,
            alternatives,
            d.nodes,
            d.shared,
            need_texts(d.gpus, d.gpu_memory_bytes, d.cpus, d.memory_bytes, d.shared),
            (d.gpus, d.gpu_memory_bytes, alternatives, d.shared),
            (d.gpus, d.gpu_memory_bytes, d.gpu_type, d.shared),
        )
        shape.log_pos = len(self.log)
        nodes, heap = self.nodes, shape.heap
        shape.seen = [node.version for node in nodes]
        fits = shape.fits = [False] * len(nodes)
        # A node without a FREE or SHARED GPU of >= 0 bytes free fits no shape with GPUs.
        if d.gpus > 0:
            nodes = [node for node in nodes if node.max_shareable >= 0]
        cpus, memory_bytes = d.cpus, d.memory_bytes
        for node in nodes:
            if node.cpus_free + CPU_EPSILON < cpus or node.memory_free_bytes < memory_bytes:
                continue  # what _score and _spread_bound check first
            if self.pack:
                found = self._score(node, shape)
                if found is not None:
                    fits[node.pos] = True
                    heap.append((found[0], node.pos, node.version, found[1]))
            else:  # a lower bound, marked stale: only nodes that surface get scored
                bound = self._spread_bound(node, shape)
                if bound is not None:
                    fits[node.pos] = True
                    heap.append((bound, node.pos, -1, ()))
        heapq.heapify(heap)
        return shape

    def _spread_bound(self, node: NodeState, shape: _Shape) -> _Key | None:
        """A key no worse than the node's ``spread`` score, from the summaries alone.

        None only when the node surely does not fit.
        """
        if node.cpus_free + CPU_EPSILON < shape.cpus or node.memory_free_bytes < shape.memory_bytes:
            return None
        k, nid = shape.gpus, node.node_id
        if k == 0:
            return (
                -(node.cpus_free - shape.cpus),
                -(node.memory_free_bytes - shape.memory_bytes),
                0,
                nid,
            )
        if shape.shared:
            if node.max_shareable < shape.gpu_memory_bytes:
                return None
            return (-node.max_shareable, -node.n_free, 0, nid)
        if node.n_free < k or node.max_free < shape.gpu_memory_bytes:
            return None
        return (0, -(node.n_free - k), -k * node.max_free, nid)

    def _refresh(self, shape: _Shape) -> None:
        """Rescore the nodes changed since this shape was last looked at."""
        nodes, seen, fits, heap = self.nodes, shape.seen, shape.fits, shape.heap
        end = len(self.log)
        for pos in self.log[shape.log_pos : end]:
            node = nodes[pos]
            if seen[pos] == node.version:
                continue
            seen[pos] = node.version
            if not fits[pos]:
                continue
            found = self._score(node, shape)
            if found is None:
                fits[pos] = False
            else:
                heapq.heappush(heap, (found[0], pos, node.version, found[1]))
        shape.log_pos = end

    def _pop_best(self, shape: _Shape) -> list[_Entry] | None:
        """The best ``shape.nodes`` distinct nodes' heap entries, or None.

        ``spread`` scores only get worse as capacity is consumed, so a stale
        entry is a lower bound: rescore it when it surfaces (lazy). ``pack``
        scores can improve (a fuller node), so ``_refresh`` rescored eagerly.
        """
        heap, nodes, lazy = shape.heap, self.nodes, not self.pack
        picked: list[_Entry] = []
        while heap and len(picked) < shape.nodes:
            entry = heapq.heappop(heap)
            _, pos, version, _ = entry
            node = nodes[pos]
            if version == node.version:
                picked.append(entry)
            elif lazy:  # the node's only entry, stale
                shape.seen[pos] = node.version
                found = self._score(node, shape)
                if found is None:
                    shape.fits[pos] = False
                else:
                    heapq.heappush(heap, (found[0], pos, node.version, found[1]))
        if len(picked) < shape.nodes:
            return None
        if lazy:  # back as stale lower bounds: rescored when they surface
            for entry in picked:
                heapq.heappush(heap, entry)
        return picked

    def _score(self, node: NodeState, shape: _Shape) -> _Scored | None:
        """The node's score and chosen GPUs for the shape, or None when it does not fit.

        Must agree with :func:`node_reason`: a node scores iff its
        reason text would be "fits". A shape with GPUs is scored by them alone
        once its host needs fit; that half is memoised per node version, shared
        by the shapes that differ only in CPUs or host memory.
        """
        if node.cpus_free + CPU_EPSILON < shape.cpus or node.memory_free_bytes < shape.memory_bytes:
            return None
        if shape.gpus == 0:
            cpus_after = node.cpus_free - shape.cpus
            memory_after = node.memory_free_bytes - shape.memory_bytes
            if self.pack:  # keep CPU work off nodes whose GPUs are free
                return (node.n_free, cpus_after, memory_after, node.node_id), ()
            return (-cpus_after, -memory_after, 0, node.node_id), ()
        hit = node.score_cache.get(shape.gpu_key)
        if hit is not None and hit[0] == node.version:
            return hit[1]
        found = self._gpu_score(node, shape)
        node.score_cache[shape.gpu_key] = (node.version, found)
        return found

    def _gpu_score(self, node: NodeState, shape: _Shape) -> _Scored | None:
        """:meth:`_score` for a shape with GPUs on a node whose host needs fit."""
        k, need, nid = shape.gpus, shape.gpu_memory_bytes, node.node_id
        if shape.shared:
            if node.max_shareable < need:
                return None
            fitting = [
                g
                for g in node.typed(shape.alternatives)
                if g.state <= SHARED and g.effective_free_bytes >= need
            ]
            if not fitting:
                return None
            if self.pack:  # prefer an already shared GPU, then the tightest fit
                g = min(fitting, key=lambda g: (g.state == FREE, g.effective_free_bytes, g.index))
                fresh = int(g.state == FREE)
                return (fresh, g.effective_free_bytes - need, node.n_free - fresh, nid), (g,)
            g = min(fitting, key=lambda g: (-g.effective_free_bytes, g.index))
            free_after = node.n_free - (g.state == FREE)
            return (-g.effective_free_bytes, -free_after, 0, nid), (g,)
        if node.n_free < k or node.max_free < need:
            return None
        # Both free lists are already in preference order (pack: tightest first).
        typed = node.typed(shape.alternatives) if shape.alternatives else node.gpus
        if not typed:
            return None
        if len(typed) < len(node.gpus):  # some GPUs here are of other types
            alts = shape.alternatives
            in_order = node.free_asc if self.pack else node.free_desc
            ranked = [g for g in in_order if g.effective_free_bytes >= need and g.matches(alts)]
            if len(ranked) < k:
                return None
        else:
            first = bisect.bisect_left(node.free_effs, need)  # the first that fits
            if node.n_free - first < k:
                return None
            ranked = node.free_asc[first:] if self.pack else node.free_desc[: node.n_free - first]
        chosen, no_link = pick_gpus(node, ranked, k)
        chosen_free = sum(g.effective_free_bytes for g in chosen)
        if self.pack:  # fewest free GPUs left, then least memory stranded on the chosen
            return (no_link, node.n_free - k, chosen_free - k * need, nid), chosen
        return (no_link, -(node.n_free - k), -chosen_free, nid), chosen

    def _commit(
        self, shape: _Shape, picked: list[_Entry], job_id: str
    ) -> tuple[NodePlacement, ...]:
        out: list[NodePlacement] = []
        for _, pos, _, gpus in sorted(picked, key=lambda e: self.nodes[e[1]].node_id):
            node = self.nodes[pos]
            node.cpus_free -= shape.cpus
            node.memory_free_bytes -= shape.memory_bytes
            for g in gpus:
                g.holders.append(job_id)
                g.held_note = g.free_note = None
                if shape.shared:
                    g.effective_free_bytes -= shape.gpu_memory_bytes
                    g.state = SHARED
                else:
                    g.state = TAKEN
            node.summarize()
            node.version += 1
            self.log.append(pos)
            ordered = sorted(gpus, key=lambda g: g.index)
            indices, uuids = tuple(g.index for g in ordered), tuple(g.uuid for g in ordered)
            out.append(NodePlacement(node.node_id, indices, uuids))
        return tuple(out)

    def _reasons(self, shape: _Shape) -> tuple[str, ...]:
        """Per-node texts for an unplaced shape, memoised per node version."""
        end = len(self.log)
        if shape.reasons is not None and shape.reasons_at == end:
            return shape.reasons
        nodes = self.nodes
        if not nodes:
            shape.reasons = ("the cluster snapshot has no nodes",)
        else:
            texts, fits, seen = shape.reason_texts, shape.reason_fits, shape.reason_seen
            if shape.reasons_log_pos < 0:
                changed: Sequence[int] = range(len(nodes))
                texts[:] = [""] * len(nodes)
                fits[:] = [False] * len(nodes)
                seen[:] = [-1] * len(nodes)
            else:
                changed = self.log[shape.reasons_log_pos : end]
            for pos in changed:
                node = nodes[pos]
                if seen[pos] != node.version:
                    seen[pos] = node.version
                    texts[pos] = node_reason(node, shape)
                    fits[pos] = texts[pos].endswith(": fits")
            shape.reasons_log_pos = end
            if shape.nodes > 1:
                suffix = gang_suffix(sum(fits), shape.nodes)
                shape.reasons = tuple(t + suffix for t in texts)
            else:
                shape.reasons = tuple(texts)
        shape.reasons_at = end
        return shape.reasons


def place(
    snapshot: ClusterSnapshot, demands: Sequence[Demand], policy: PlacementPolicy
) -> list[Decision]:
    """Decide every demand, in order, against one snapshot; one decision per demand.

    Each placed demand consumes its GPUs, CPUs and memory for the demands after
    it, so the result never hands one GPU to two exclusive jobs and never
    over-commits memory or CPUs. Gangs (``gpus`` on one node, ``nodes``
    distinct nodes) are all-or-nothing.
    """
    one_pass = _Pass(snapshot, policy)
    return [one_pass.decide(d) for d in demands]


def with_placements(
    snapshot: ClusterSnapshot, demands: Sequence[Demand], decisions: Sequence[Decision]
) -> ClusterSnapshot:
    """The snapshot plus a :class:`Holding` (no pid yet) for every placed decision.

    What the next pass would see before NVML shows the new processes; also
    what :func:`fragmentation` measures after a pass.
    """
    if len(demands) != len(decisions):
        raise ValueError("one decision per demand expected")
    added: list[Holding] = []
    for demand, decision in zip(demands, decisions, strict=True):
        if demand.job_id != decision.job_id:
            raise ValueError(f"decision {decision.job_id} does not match {demand.job_id}")
        for p in decision.placement:
            added.append(
                Holding(
                    demand.job_id,
                    p.node_id,
                    p.gpu_uuids,
                    demand.gpu_memory_bytes,
                    demand.cpus,
                    demand.memory_bytes,
                    shared=demand.shared,
                )
            )
    return ClusterSnapshot(snapshot.nodes, snapshot.holdings + tuple(added))


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
