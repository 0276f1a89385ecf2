"""Placement properties: hypothesis invariants over random clusters.

Every decision is checked against ``Model``, an independent, slow account of the
rules. Inputs come from tests/unit/placement_factories.py.
"""

from __future__ import annotations

import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.core.model import (
    ClusterSnapshot,
    Decision,
    Demand,
    Holding,
    NodePlacement,
    PlacementPolicy,
)
from scheduler.core.placement import place, with_placements
from tests.unit.placement_factories import GIB, _demand, _gpu, _node, hold
from workers.interface.telemetry import GpuProcess, GpuReading, GpuUuid, NodeReading

# --------------------------------------------------------------------------- properties


def gib(n: int) -> int:
    return n * GIB


NAMES = ["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB", "Tesla T4", None]


def mostly(usual: Any, *rare: Any) -> st.SearchStrategy[Any]:
    """``usual`` about three times in four, else one of ``rare``."""
    return st.sampled_from([usual, usual, usual, usual, usual, usual, *rare])


@st.composite
def shapes(draw: st.DrawFn) -> dict[str, Any]:
    """One demand shape (resources without a job id)."""
    shared = draw(mostly(False, True))
    return {
        "gpus": 1 if shared else draw(st.sampled_from([0, 1, 1, 1, 2, 2, 3])),
        "gpu_gib": draw(st.sampled_from([0, 4, 10, 20, 30, 39])),
        "cpus": float(draw(st.integers(0, 6))),
        "memory_bytes": draw(st.integers(0, 40)) * GIB,
        "gpu_type": draw(mostly(None, "H100", "a100|t4")),
        "nodes": draw(mostly(1, 2, 3)),
        "shared": shared,
    }


@st.composite
def clusters(draw: st.DrawFn) -> tuple[ClusterSnapshot, list[Demand], PlacementPolicy]:
    """Small random clusters (holdings, unknowns, NVLink) and demand lists.

    Demands repeat a few shapes, as real queues do, so the per-shape memo and
    the rescoring of changed nodes are exercised; most GPUs are usable.
    """
    nodes: list[NodeReading] = []
    holdings: list[Holding] = []
    for n in range(draw(st.integers(0, 5))):
        node_id = f"node-{n}"
        n_gpus = draw(st.integers(0, 4))
        gpus = []
        for i in range(n_gpus):
            pids = draw(st.lists(st.integers(1, 4), max_size=2, unique=True))
            gpus.append(
                _gpu(
                    i,
                    name=draw(mostly(NAMES[0], *NAMES[1:])),
                    free_gib=draw(st.one_of(st.integers(0, 40), mostly(40, None))),
                    util=draw(mostly(0.0, None, 50.0, 95.0)),
                    processes=tuple(
                        GpuProcess(p, draw(st.one_of(st.none(), st.integers(0, 8).map(gib))))
                        for p in pids
                    ),
                    peers=tuple(
                        draw(st.lists(st.integers(0, n_gpus - 1), max_size=n_gpus, unique=True))
                    ),
                    available=draw(mostly(True, False)),
                    mig=draw(mostly(False, None, True)),
                )
            )
            if draw(st.integers(0, 4)) == 0:
                holdings.append(
                    hold(
                        f"h{n}-{i}",
                        node_id,
                        i,
                        gib=draw(st.integers(0, 16)),
                        shared=draw(st.booleans()),
                        pid=draw(st.one_of(st.none(), st.integers(1, 4))),
                        cpus=float(draw(st.integers(0, 4))),
                    )
                )
        cpus = draw(st.integers(0, 24))
        nodes.append(_node(node_id, gpus=gpus, cpus=cpus, memory_gib=draw(st.integers(0, 96))))
    palette = draw(st.lists(shapes(), min_size=1, max_size=4))
    picks = draw(st.lists(st.integers(0, len(palette) - 1), max_size=30))
    demands = [_demand(job_id=f"d{j}", **palette[k]) for j, k in enumerate(picks)]
    policy = PlacementPolicy(
        strategy=draw(st.sampled_from(["pack", "spread"])),
        memory_headroom_bytes=draw(st.sampled_from([0, 512 * 2**20])),
        max_util_pct=draw(st.sampled_from([40.0, 90.0])),
    )
    return ClusterSnapshot(tuple(nodes), tuple(holdings)), demands, policy


class Model:
    """An independent, slow account of the rules, to check decisions against."""

    def __init__(self, snapshot: ClusterSnapshot, policy: PlacementPolicy) -> None:
        self.nodes: dict[str, NodeReading] = {n.node_id: n for n in snapshot.nodes}
        self.cpus: dict[str, float] = {n.node_id: float(n.cpus) for n in snapshot.nodes}
        self.mem: dict[str, int] = {n.node_id: n.memory_total_bytes for n in snapshot.nodes}
        self.free: dict[tuple[str, int], int] = {}  # eligible GPUs -> effective free
        self.exclusive: set[tuple[str, int]] = set()
        self.shared: set[tuple[str, int]] = set()
        index: dict[tuple[str, GpuUuid], GpuReading] = {
            (n.node_id, g.uuid): g for n in snapshot.nodes for g in n.gpus
        }
        unseen: dict[tuple[str, int], int] = {}
        for h in snapshot.holdings:
            if h.node_id not in self.nodes:
                continue
            self.cpus[h.node_id] -= h.cpus
            self.mem[h.node_id] -= h.memory_bytes
            for u in h.gpu_uuids:
                g = index[(h.node_id, u)]
                key = (h.node_id, g.index)
                (self.shared if h.shared else self.exclusive).add(key)
                seen = sum(p.used_memory_bytes or 0 for p in g.processes if p.pid == h.pid)
                unseen[key] = unseen.get(key, 0) + max(0, h.gpu_memory_bytes - seen)
        for n in snapshot.nodes:
            for g in n.gpus:
                key = (n.node_id, g.index)
                ours = key in self.shared or key in self.exclusive
                if (
                    g.available
                    and g.memory_free_bytes is not None
                    and g.util_pct is not None
                    and not g.mig_mode
                    and (g.util_pct <= policy.max_util_pct or ours)
                ):
                    self.free[key] = (
                        g.memory_free_bytes - policy.memory_headroom_bytes - unseen.get(key, 0)
                    )

    def usable(self, node_id: str, d: Demand) -> list[int]:
        alts = [a.strip().lower() for a in (d.gpu_type or "").split("|") if a.strip()]
        out = []
        for g in self.nodes[node_id].gpus:
            key = (node_id, g.index)
            if key not in self.free or self.free[key] < d.gpu_memory_bytes:
                continue
            if alts and not (g.name and any(a in g.name.lower() for a in alts)):
                continue
            if key in self.exclusive or (key in self.shared and not d.shared):
                continue
            out.append(g.index)
        return out

    def fits(self, node_id: str, d: Demand) -> bool:
        return (
            self.cpus[node_id] + 1e-9 >= d.cpus
            and self.mem[node_id] >= d.memory_bytes
            and len(self.usable(node_id, d)) >= d.gpus
        )

    def apply(self, p: NodePlacement, d: Demand) -> None:
        self.cpus[p.node_id] -= d.cpus
        self.mem[p.node_id] -= d.memory_bytes
        for i in p.gpu_indices:
            key = (p.node_id, i)
            if d.shared:
                self.free[key] -= d.gpu_memory_bytes
                self.shared.add(key)
            else:
                self.exclusive.add(key)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters())
def test_invariants(case: tuple[ClusterSnapshot, list[Demand], PlacementPolicy]) -> None:
    snapshot, demands, policy = case
    decisions = place(snapshot, demands, policy)
    assert place(snapshot, demands, policy) == decisions  # deterministic
    check_invariants(snapshot, demands, policy, decisions)


def check_invariants(
    snapshot: ClusterSnapshot,
    demands: list[Demand],
    policy: PlacementPolicy,
    decisions: list[Decision],
) -> None:
    """Every decision agrees with ``Model``; nothing is over-committed."""
    assert [d.job_id for d in decisions] == [d.job_id for d in demands]
    model = Model(snapshot, policy)
    node_ids = [n.node_id for n in snapshot.nodes]
    for demand, decision in zip(demands, decisions, strict=True):
        if decision.placed:
            assert decision.reasons == ()
            # gang: `nodes` distinct nodes, each with exactly `gpus` distinct GPUs
            assert len(decision.placement) == demand.nodes
            assert len({p.node_id for p in decision.placement}) == demand.nodes
            for p in decision.placement:
                assert len(set(p.gpu_indices)) == len(p.gpu_indices) == demand.gpus
                # every chosen GPU was usable right then: never a GPU twice to exclusive
                # jobs, never more memory than its effective free, never over CPUs/memory
                assert model.fits(p.node_id, demand)
                assert set(p.gpu_indices) <= set(model.usable(p.node_id, demand))
                node = model.nodes[p.node_id]
                by_index = {g.index: g.uuid for g in node.gpus}
                assert p.gpu_uuids == tuple(by_index[i] for i in p.gpu_indices)
            for p in decision.placement:
                model.apply(p, demand)
        else:
            assert decision.placement == ()
            assert decision.reasons
            if node_ids:
                assert len(decision.reasons) == len(node_ids)
                for node_id, reason in zip(sorted(node_ids), decision.reasons, strict=True):
                    assert reason.startswith(f"{node_id}: ")
                # complete: the search misses no fitting node, and texts agree with it
                fitting = [n for n in node_ids if model.fits(n, demand)]
                assert len(fitting) < demand.nodes
                said_fits = [r for r in decision.reasons if r.split(": ", 1)[1].startswith("fits")]
                assert len(said_fits) == len(fitting)
    # memory never over-committed; an exclusive GPU goes to one job, never a held one
    initial = Model(snapshot, policy)
    placed_memory: dict[tuple[str, int], int] = {}
    users: dict[tuple[str, int], list[bool]] = {}
    for demand, decision in zip(demands, decisions, strict=True):
        for p in decision.placement:
            for i in p.gpu_indices:
                key = (p.node_id, i)
                placed_memory[key] = placed_memory.get(key, 0) + demand.gpu_memory_bytes
                users.setdefault(key, []).append(demand.shared)
    for key, total in placed_memory.items():
        assert total <= initial.free[key]
        if not all(users[key]):
            assert users[key] == [False]
            assert key not in initial.exclusive and key not in initial.shared
        assert key not in initial.exclusive


@settings(max_examples=100, deadline=None)
@given(clusters(), st.randoms(use_true_random=False))
def test_node_order_does_not_matter(
    case: tuple[ClusterSnapshot, list[Demand], PlacementPolicy], rnd: random.Random
) -> None:
    snapshot, demands, policy = case
    nodes = list(snapshot.nodes)
    rnd.shuffle(nodes)
    shuffled = ClusterSnapshot(tuple(nodes), snapshot.holdings)
    assert place(shuffled, demands, policy) == place(snapshot, demands, policy)


def one_by_one(
    snapshot: ClusterSnapshot, demands: list[Demand], policy: PlacementPolicy
) -> list[Decision]:
    """The reference for a pass's memos: each demand decided by a pass of its own, on the
    snapshot plus the earlier decisions' holdings (nothing kept from one demand to the next)."""
    current, out = snapshot, []
    for demand in demands:
        decision = place(current, [demand], policy)[0]
        current = with_placements(current, [demand], [decision])
        out.append(decision)
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters())
def test_one_pass_decides_as_a_pass_per_demand(
    case: tuple[ClusterSnapshot, list[Demand], PlacementPolicy],
) -> None:
    # the per-shape heaps, the per-node score and reason memos and the skipped full nodes
    # change no choice and no text
    snapshot, demands, policy = case
    assert place(snapshot, demands, policy) == one_by_one(snapshot, demands, policy)


def seeded_case(seed: int) -> tuple[ClusterSnapshot, list[Demand], PlacementPolicy]:
    """A bigger case than hypothesis draws: 16 nodes of 8 GPUs, mostly of one type per
    node, some GPUs held, shared, busy or short of memory; 300 demands of 36 shapes in
    threes that differ only in CPUs and host memory (what the per-node memos share)."""
    rng = random.Random(seed)
    nodes: list[NodeReading] = []
    holdings: list[Holding] = []
    for n in range(16):
        node_id = f"node-{n:02d}"
        name = rng.choice(NAMES)
        gpus = []
        for i in range(8):
            gpus.append(
                _gpu(
                    i,
                    name=rng.choice(NAMES) if rng.random() < 0.1 else name,
                    free_gib=rng.choice([40, 40, 40, 30, 12, 0]),
                    util=rng.choice([0.0, 0.0, 0.0, 0.0, 0.0, 95.0, None]),
                    peers=tuple(j for j in range(8) if j != i and rng.random() < 0.7),
                )
            )
            roll = rng.random()
            if roll < 0.15:
                holdings.append(
                    hold(
                        f"h{n}-{i}",
                        node_id,
                        i,
                        gib=rng.randint(0, 16),
                        shared=roll < 0.05,
                        cpus=float(rng.randint(0, 8)),
                    )
                )
        cpus, memory_gib = rng.choice([32, 64]), rng.choice([128, 256])
        nodes.append(_node(node_id, gpus=gpus, cpus=cpus, memory_gib=memory_gib))
    shapes: list[dict[str, Any]] = []
    for _ in range(12):
        shared = rng.random() < 0.15
        g = 1 if shared else rng.choice([0, 1, 1, 2, 4, 8])
        gpu_shape = {
            "gpus": g,
            "gpu_gib": rng.choice([0, 8, 16, 30, 39]) if g else 0,
            "gpu_type": rng.choice([None, None, "H100", "a100|t4", "A100"]),
            "nodes": 1 if shared else rng.choice([1, 1, 1, 2]),
            "shared": shared,
        }
        for _ in range(3):
            host = {"cpus": float(rng.randint(0, 16)), "memory_bytes": rng.randint(0, 64) * GIB}
            shapes.append({**gpu_shape, **host})
    demands = [_demand(job_id=f"j{i}", **rng.choice(shapes)) for i in range(300)]
    policy = PlacementPolicy(
        strategy=rng.choice(["pack", "spread"]),
        memory_headroom_bytes=rng.choice([0, 512 * 2**20]),
        max_util_pct=rng.choice([40.0, 90.0]),
    )
    return ClusterSnapshot(tuple(nodes), tuple(holdings)), demands, policy


def test_one_pass_decides_as_a_pass_per_demand_at_size() -> None:
    for seed in range(8):
        snapshot, demands, policy = seeded_case(seed)
        decisions = place(snapshot, demands, policy)
        assert decisions == one_by_one(snapshot, demands, policy), f"seed {seed}"
        check_invariants(snapshot, demands, policy, decisions)
        assert any(d.placed for d in decisions) and not all(d.placed for d in decisions)
