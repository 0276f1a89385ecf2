"""Placement: (cluster snapshot, pending demands, policy) -> decisions with reasons.

Pure: no I/O, no clock, no randomness; equal inputs give equal outputs. The
live reconcile loop and the trace simulator call the same :func:`place`.

One pass works on a private, mutable copy of the cluster built once from the
snapshot: per GPU the *effective free memory* (measured free - headroom -
memory the scheduler assigned that NVML does not show yet) and a state (free,
shared, taken, blocked); per node the free CPUs and host memory. Demands are
taken in the given order and each placement consumes capacity for the later
ones. Because a pass only ever consumes, a node that cannot host a demand
*shape* now cannot host it later in the pass; the search leans on that:

* per shape, a heap of node candidates keyed by the strategy's score, kept
  current from a log of changed nodes (each node carries a version counter);
* a shape that fits nowhere is dead for the rest of the pass, and its per-node
  reason texts are memoised per node version, so once the cluster is full the
  remaining jobs of known shapes cost a dictionary lookup each.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from scheduler.placement_reasons import (
    CPU_EPSILON,
    FREE,
    SHARED,
    TAKEN,
    GpuState,
    NodeState,
    build_nodes,
    gang_suffix,
    need_texts,
    node_reason,
    pick_gpus,
    type_alternatives,
)
from scheduler.placement_reasons import explain as explain  # re-exported (public API)
from scheduler.placement_reasons import fragmentation as fragmentation  # re-exported
from workers.telemetry import GpuUuid, NodeReading


@dataclass(frozen=True, slots=True)
class Demand:
    """One job's (or one replica's) request, per node.

    ``gpus`` GPUs on each of ``nodes`` distinct nodes, each GPU with at least
    ``gpu_memory_bytes`` effective free memory; ``cpus`` and ``memory_bytes``
    of host resources on each node. ``gpu_type`` lists alternatives
    (``"H100|A100"``) matched case-insensitively as substrings of the GPU name.
    ``shared`` (real-time replicas, ``gpus == 1``) may share a GPU by memory.

    >>> Demand("train-7", gpus=2, gpu_memory_bytes=40 * 2**30, cpus=8, memory_bytes=2**36)
    ... # doctest: +ELLIPSIS
    Demand(job_id='train-7', gpus=2, ...)
    """

    job_id: str
    gpus: int
    gpu_memory_bytes: int
    cpus: float
    memory_bytes: int
    gpu_type: str | None = None
    nodes: int = 1
    shared: bool = False

    def __post_init__(self) -> None:
        if self.gpus < 0 or self.gpu_memory_bytes < 0 or self.cpus < 0 or self.memory_bytes < 0:
            raise ValueError(f"demand {self.job_id}: resources must not be negative")
        if self.nodes < 1:
            raise ValueError(f"demand {self.job_id}: nodes must be at least 1, got {self.nodes}")
        if self.shared and self.gpus != 1:
            raise ValueError(f"demand {self.job_id}: a shared demand takes exactly 1 GPU")
        if self.gpu_type is not None and not type_alternatives(self.gpu_type):
            raise ValueError(f"demand {self.job_id}: gpu_type {self.gpu_type!r} names no type")


@dataclass(frozen=True, slots=True)
class Holding:
    """Capacity the scheduler already assigned (a running or scheduled job).

    ``gpu_memory_bytes`` is per GPU. Until NVML shows process ``pid`` using
    that much on a GPU, the difference is subtracted from the GPU's free memory.

    >>> Holding("train-3", "node-a", (GpuUuid("GPU-1"),), 2**34, cpus=4, memory_bytes=2**35)
    ... # doctest: +ELLIPSIS
    Holding(job_id='train-3', node_id='node-a', ...)
    """

    job_id: str
    node_id: str
    gpu_uuids: tuple[GpuUuid, ...]
    gpu_memory_bytes: int
    cpus: float
    memory_bytes: int
    pid: int | None = None
    shared: bool = False


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    """Node telemetry plus what the scheduler holds: the whole input about the cluster.

    >>> ClusterSnapshot(nodes=())
    ClusterSnapshot(nodes=(), holdings=())
    """

    nodes: tuple[NodeReading, ...]
    holdings: tuple[Holding, ...] = ()


@dataclass(frozen=True, slots=True)
class PlacementPolicy:
    """How to choose among fitting nodes and how cautious to be.

    ``pack`` is best fit (fill nodes, keep whole nodes free for gangs);
    ``spread`` is worst fit (most free capacity). ``memory_headroom_bytes`` is
    kept free on every GPU; GPUs busier than ``max_util_pct`` because of other
    tenants are skipped.

    >>> PlacementPolicy(strategy="spread").memory_headroom_bytes == 512 * 2**20
    True
    """

    strategy: Literal["pack", "spread"] = "pack"
    memory_headroom_bytes: int = 512 * 2**20
    max_util_pct: float = 90.0


@dataclass(frozen=True, slots=True)
class NodePlacement:
    """The GPUs chosen on one node; indices are for ``CUDA_VISIBLE_DEVICES`` only.

    >>> NodePlacement("node-a", (0, 1), (GpuUuid("GPU-a0"), GpuUuid("GPU-a1"))).gpu_indices
    (0, 1)
    """

    node_id: str
    gpu_indices: tuple[int, ...]
    gpu_uuids: tuple[GpuUuid, ...]


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome for one demand: where it goes, or per node why not.

    Placed: ``placement`` has one entry per node and ``reasons`` is empty.
    Unplaced: ``placement`` is empty and ``reasons`` has one line per node,
    each starting with the node id (reason tuples may be shared by decisions).

    >>> Decision("j1", (), ("node-a: needs 4 CPUs; 2 free",)).placed
    False
    """

    job_id: str
    placement: tuple[NodePlacement, ...]
    reasons: tuple[str, ...]

    @property
    def placed(self) -> bool:
        """True when the demand got all of its nodes."""
        return bool(self.placement)


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

_Key = tuple[float, float, float, str]
"""A node's score for a shape; smaller is better; the node id makes it unique."""
_Entry = tuple[_Key, int, int, tuple[GpuState, ...]]
"""A heap entry: (score, node position, node version when scored, chosen GPUs)."""


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
        shape = _Shape(
            d.gpus,
            d.gpu_memory_bytes,
            d.cpus,
            d.memory_bytes,
            d.gpu_type,
            type_alternatives(d.gpu_type),
            d.nodes,
            d.shared,
            need_texts(d.gpus, d.gpu_memory_bytes, d.cpus, d.memory_bytes, d.shared),
        )
        shape.log_pos = len(self.log)
        for node in self.nodes:
            shape.seen.append(node.version)
            if self.pack:
                found = self._score(node, shape)
            else:  # a lower bound, marked stale: only nodes that surface get scored
                bound = self._spread_bound(node, shape)
                found = None if bound is None else (bound, ())
            shape.fits.append(found is not None)
            if found is not None:
                version = node.version if self.pack else -1
                shape.heap.append((found[0], node.pos, version, found[1]))
        heapq.heapify(shape.heap)
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

    def _score(self, node: NodeState, shape: _Shape) -> tuple[_Key, tuple[GpuState, ...]] | None:
        """The node's score and chosen GPUs for the shape, or None when it does not fit.

        Must agree with ``placement_reasons.node_reason``: a node scores iff its
        reason text would be "fits".
        """
        if node.cpus_free + CPU_EPSILON < shape.cpus or node.memory_free_bytes < shape.memory_bytes:
            return None
        k, need, nid = shape.gpus, shape.gpu_memory_bytes, node.node_id
        if k == 0:
            cpus_after = node.cpus_free - shape.cpus
            memory_after = node.memory_free_bytes - shape.memory_bytes
            if self.pack:  # keep CPU work off nodes whose GPUs are free
                return (node.n_free, cpus_after, memory_after, nid), ()
            return (-cpus_after, -memory_after, 0, nid), ()
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
        if shape.alternatives:
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
