"""Placement: table-driven rules, then hypothesis invariants over random clusters.

Pure: no Ray, no network. ``make_gpu``/``make_node``/``make_demand`` build the
inputs; GPU uuids are ``"<node>-GPU-<index>"`` (see :func:`uuid`).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from typing import Any, Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.placement import (
    ClusterSnapshot,
    Decision,
    Demand,
    Holding,
    NodePlacement,
    PlacementPolicy,
    explain,
    fragmentation,
    place,
    with_placements,
)
from workers.telemetry import GpuProcess, GpuReading, GpuUuid, NodeId, NodeReading

GIB = 2**30
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


@pytest.fixture
def make_gpu() -> Callable[..., GpuReading]:
    """Factory: one GPU reading; ``free_gib``, ``util``, ``peers`` (indices), ..."""
    return _gpu


@pytest.fixture
def make_node() -> Callable[..., NodeReading]:
    """Factory: one node; ``gpus`` is a count or a list of ``make_gpu`` readings."""
    return _node


@pytest.fixture
def make_demand() -> Callable[..., Demand]:
    """Factory: one demand (1 GPU, 10 GiB, 4 CPUs, 16 GiB); ``gpu_gib`` sets GPU memory."""
    return _demand


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


# --------------------------------------------------------------------------- memory


@pytest.mark.parametrize(
    ("gpu_kw", "holdings", "demand_kw", "policy", "placed", "text"),
    [
        # headroom: 10 GiB free - 0.5 GiB headroom = 9.5 GiB effective
        ({"free_gib": 10}, (), {"gpu_gib": 9.5}, PlacementPolicy(), True, ""),
        ({"free_gib": 10}, (), {"gpu_gib": 9.6}, PlacementPolicy(), False, "GPU 0: 9.5 GiB free"),
        ({"free_gib": 10}, (), {"gpu_gib": 10}, NO_HEADROOM, True, ""),
        # assigned (shared) 8 GiB, pid unknown: all 8 unseen -> 20 - 0.5 - 8 = 11.5
        (
            {"free_gib": 20},
            (hold("r", "node-a", 0, shared=True),),
            {"gpu_gib": 11.5},
            None,
            True,
            "",
        ),
        (
            {"free_gib": 20},
            (hold("r", "node-a", 0, shared=True),),
            {"gpu_gib": 12},
            None,
            False,
            "needs 1 GPU with ≥ 12.0 GiB free to share; has 0 (GPU 0: 11.5 GiB free)",
        ),
        # pid listed using 6 of its 8 GiB: 2 unseen -> 17.5
        (
            {"free_gib": 20, "processes": (GpuProcess(42, 6 * GIB),)},
            (hold("r", "node-a", 0, shared=True, pid=42),),
            {"gpu_gib": 17.5},
            None,
            True,
            "",
        ),
        (
            {"free_gib": 20, "processes": (GpuProcess(42, 6 * GIB),)},
            (hold("r", "node-a", 0, shared=True, pid=42),),
            {"gpu_gib": 17.6},
            None,
            False,
            "GPU 0: 17.5 GiB free",
        ),
        # pid uses more than assigned: nothing unseen -> 19.5
        (
            {"free_gib": 20, "processes": (GpuProcess(42, 10 * GIB),)},
            (hold("r", "node-a", 0, shared=True, pid=42),),
            {"gpu_gib": 19.5},
            None,
            True,
            "",
        ),
        # pid listed with unknown usage counts as 0 observed (safe side): 11.5
        (
            {"free_gib": 20, "processes": (GpuProcess(42, None),)},
            (hold("r", "node-a", 0, shared=True, pid=42),),
            {"gpu_gib": 12},
            None,
            False,
            "GPU 0: 11.5 GiB free",
        ),
        # another pid's usage does not count as ours
        (
            {"free_gib": 20, "processes": (GpuProcess(7, 8 * GIB),)},
            (hold("r", "node-a", 0, shared=True, pid=42),),
            {"gpu_gib": 12},
            None,
            False,
            "GPU 0: 11.5 GiB free",
        ),
    ],
)
def test_effective_free_memory(
    make_gpu: Callable[..., GpuReading],
    make_node: Callable[..., NodeReading],
    make_demand: Callable[..., Demand],
    gpu_kw: dict[str, Any],
    holdings: tuple[Holding, ...],
    demand_kw: dict[str, Any],
    policy: PlacementPolicy | None,
    placed: bool,
    text: str,
) -> None:
    shared = bool(holdings)
    snapshot = ClusterSnapshot((make_node(gpus=[make_gpu(**gpu_kw)]),), holdings)
    demand = make_demand(shared=shared, **demand_kw)
    decision = only(place(snapshot, [demand], policy or PlacementPolicy()))
    assert decision.placed is placed
    assert text in " | ".join(decision.reasons)


# --------------------------------------------------------------------------- eligibility


@pytest.mark.parametrize(
    ("gpu_kw", "demand_kw", "placed", "text"),
    [
        ({"available": False}, {}, False, "node-a: needs 1 GPU with ≥ 10.0 GiB free; has 0 "),
        ({"available": False}, {}, False, "GPU 0 unavailable"),
        ({"free_gib": None}, {}, False, "GPU 0: free memory unknown"),
        ({"util": None}, {}, False, "GPU 0: utilization unknown"),
        ({"util": 95.0}, {}, False, "GPU 0: 95% busy (max 90%)"),
        ({"util": 90.0}, {}, True, ""),
        ({"util": 90.5}, {}, False, "GPU 0: 90.5% busy (max 90%)"),
        ({"mig": True}, {}, False, "GPU 0: MIG mode on"),
        ({"mig": None}, {}, True, ""),  # not reported: MIG is opt-in, the GPU is whole
        ({"name": None}, {"gpu_type": "A100"}, False, "no GPU of type A100 (has unknown type)"),
        ({"name": None}, {}, True, ""),
    ],
)
def test_gpu_eligibility(
    make_gpu: Callable[..., GpuReading],
    make_node: Callable[..., NodeReading],
    make_demand: Callable[..., Demand],
    gpu_kw: dict[str, Any],
    demand_kw: dict[str, Any],
    placed: bool,
    text: str,
) -> None:
    snapshot = ClusterSnapshot((make_node(gpus=[make_gpu(**gpu_kw)]),))
    decision = only(place(snapshot, [make_demand(**demand_kw)], PlacementPolicy()))
    assert decision.placed is placed
    assert text in " | ".join(decision.reasons)


def test_busy_gpu_with_our_holding_is_not_skipped(
    make_gpu: Callable[..., GpuReading],
    make_node: Callable[..., NodeReading],
    make_demand: Callable[..., Demand],
) -> None:
    snapshot = ClusterSnapshot(
        (make_node(gpus=[make_gpu(util=99.0)]),), (hold("r1", "node-a", 0, shared=True),)
    )
    assert only(place(snapshot, [make_demand(shared=True)], PlacementPolicy())).placed


@pytest.mark.parametrize(
    ("gpu_type", "names", "placed", "text"),
    [
        ("H100", ["NVIDIA H100 80GB HBM3"], True, ""),
        ("h100", ["NVIDIA H100 80GB HBM3"], True, ""),
        ("H100|A100", ["NVIDIA A100-SXM4-40GB"], True, ""),
        (" A100 | H100 ", ["NVIDIA A100-SXM4-40GB"], True, ""),
        ("H100", ["Tesla T4"], False, "node-a: no GPU of type H100 (has Tesla T4)"),
        ("H100", ["Tesla T4", "NVIDIA H100 80GB HBM3"], True, ""),
        ("A100-SXM4-80GB", ["NVIDIA A100-SXM4-40GB"], False, "(has NVIDIA A100-SXM4-40GB)"),
    ],
)
def test_gpu_type(
    make_gpu: Callable[..., GpuReading],
    make_node: Callable[..., NodeReading],
    make_demand: Callable[..., Demand],
    gpu_type: str,
    names: list[str],
    placed: bool,
    text: str,
) -> None:
    gpus = [make_gpu(i, name=n) for i, n in enumerate(names)]
    decision = only(
        place(
            ClusterSnapshot((make_node(gpus=gpus),)),
            [make_demand(gpu_type=gpu_type)],
            NO_HEADROOM,
        )
    )
    assert decision.placed is placed
    assert text in " | ".join(decision.reasons)
    if placed:
        chosen = names[decision.placement[0].gpu_indices[0]].lower()
        assert any(alt.strip().lower() in chosen for alt in gpu_type.split("|"))


def test_gpu_type_mismatch_per_gpu_on_mixed_node(
    make_gpu: Callable[..., GpuReading],
    make_node: Callable[..., NodeReading],
    make_demand: Callable[..., Demand],
) -> None:
    gpus = [make_gpu(0, name="Tesla T4"), make_gpu(1, name="NVIDIA H100 80GB HBM3")]
    decision = only(
        place(
            ClusterSnapshot((make_node(gpus=gpus),)),
            [make_demand(gpus=2, gpu_type="H100")],
            NO_HEADROOM,
        )
    )
    assert decision.reasons == (
        "node-a: needs 2 GPUs with ≥ 10.0 GiB free; has 1 (GPU 0: Tesla T4, not H100)",
    )


# --------------------------------------------------------------------------- exclusive / shared


@pytest.mark.parametrize(
    ("holding_shared", "demand_shared", "placed", "text"),
    [
        (False, False, False, "GPU 0: held by old"),
        (False, True, False, "GPU 0: held by old"),
        (True, False, False, "GPU 0: shared by old"),
        (True, True, True, ""),
    ],
)
def test_exclusive_and_shared_holdings(
    make_node: Callable[..., NodeReading],
    make_demand: Callable[..., Demand],
    holding_shared: bool,
    demand_shared: bool,
    placed: bool,
    text: str,
) -> None:
    snapshot = ClusterSnapshot(
        (make_node(gpus=1),), (hold("old", "node-a", 0, shared=holding_shared),)
    )
    decision = only(place(snapshot, [make_demand(shared=demand_shared)], NO_HEADROOM))
    assert decision.placed is placed
    assert text in " | ".join(decision.reasons)


def test_placements_consume_capacity_within_a_pass(
    make_gpu: Callable[..., GpuReading],
    make_node: Callable[..., NodeReading],
    make_demand: Callable[..., Demand],
) -> None:
    snapshot = ClusterSnapshot((make_node(gpus=[make_gpu(free_gib=24)]),))
    first, second = place(snapshot, [make_demand(job_id="a"), make_demand(job_id="b")], NO_HEADROOM)
    assert first.placed and not second.placed
    assert second.reasons == ("node-a: needs 1 GPU with ≥ 10.0 GiB free; has 0 (GPU 0: held by a)",)
    replicas = [make_demand(job_id=f"r{i}", shared=True) for i in range(3)]
    r1, r2, r3 = place(snapshot, replicas, NO_HEADROOM)
    assert r1.placement == r2.placement == (NodePlacement("node-a", (0,), (uuid("node-a", 0),)),)
    assert not r3.placed
    assert "GPU 0: 4.0 GiB free" in r3.reasons[0]


@pytest.mark.parametrize(
    "kw",
    [
        {"shared": True, "gpus": 2},
        {"shared": True, "gpus": 0},
        {"gpus": -1},
        {"nodes": 0},
        {"gpu_type": "|"},
        {"cpus": -1.0},
    ],
)
def test_invalid_demands_are_refused(
    make_demand: Callable[..., Demand], kw: dict[str, Any]
) -> None:
    with pytest.raises(ValueError, match="job-1"):
        make_demand(**kw)


# --------------------------------------------------------------------------- strategy


def _free_gpus_node(node_id: str, free: int, total: int = 4) -> tuple[NodeReading, list[Holding]]:
    held = [hold(f"{node_id}-old{i}", node_id, i) for i in range(free, total)]
    return _node(node_id, gpus=total), held


@pytest.mark.parametrize(
    ("strategy", "expected_node"),
    [("pack", "node-b"), ("spread", "node-a")],
)
def test_pack_fills_the_fullest_node_spread_the_emptiest(
    make_demand: Callable[..., Demand], strategy: Strategy, expected_node: str
) -> None:
    a, held_a = _free_gpus_node("node-a", free=4)
    b, held_b = _free_gpus_node("node-b", free=2)
    c, held_c = _free_gpus_node("node-c", free=3)
    snapshot = ClusterSnapshot((a, b, c), tuple(held_a + held_b + held_c))
    policy = PlacementPolicy(strategy=strategy)
    (p,) = only(place(snapshot, [make_demand()], policy)).placement
    assert p.node_id == expected_node


@pytest.mark.parametrize(
    ("strategy", "need_gib", "expected_gpu"),
    [("pack", 30, 1), ("spread", 30, 2), ("pack", 10, 0), ("pack", 50, 2)],
)
def test_gpu_choice_on_a_node(
    make_gpu: Callable[..., GpuReading],
    make_node: Callable[..., NodeReading],
    make_demand: Callable[..., Demand],
    strategy: Strategy,
    need_gib: float,
    expected_gpu: int,
) -> None:
    gpus = [make_gpu(0, free_gib=20), make_gpu(1, free_gib=40), make_gpu(2, free_gib=80)]
    policy = PlacementPolicy(strategy=strategy, memory_headroom_bytes=0)
    decision = only(
        place(ClusterSnapshot((make_node(gpus=gpus),)), [make_demand(gpu_gib=need_gib)], policy)
    )
    assert decision.placement[0].gpu_indices == (expected_gpu,)


@pytest.mark.parametrize("strategy", ["pack", "spread"])
def test_ties_break_by_node_id_then_gpu_index(
    make_node: Callable[..., NodeReading], make_demand: Callable[..., Demand], strategy: Strategy
) -> None:
    snapshot = ClusterSnapshot((make_node("node-b", gpus=2), make_node("node-a", gpus=2)))
    policy = PlacementPolicy(strategy=strategy)
    (p,) = only(place(snapshot, [make_demand()], policy)).placement
    assert (p.node_id, p.gpu_indices) == ("node-a", (0,))


def test_shared_pack_prefers_an_already_shared_gpu(
    make_node: Callable[..., NodeReading], make_demand: Callable[..., Demand]
) -> None:
    snapshot = ClusterSnapshot((make_node(gpus=2),), (hold("r0", "node-a", 1, shared=True),))
    decision = only(place(snapshot, [make_demand(shared=True)], PlacementPolicy()))
    assert decision.placement[0].gpu_indices == (1,)
    spread = only(place(snapshot, [make_demand(shared=True)], PlacementPolicy(strategy="spread")))
    assert spread.placement[0].gpu_indices == (0,)


def test_cpu_only_demand(make_node: Callable[..., NodeReading]) -> None:
    snapshot = ClusterSnapshot((make_node("node-a", gpus=2), make_node("node-b", gpus=0)))
    demand = _demand(gpus=0, gpu_memory_bytes=0)
    (p,) = only(place(snapshot, [demand], PlacementPolicy())).placement
    assert p == NodePlacement("node-b", (), ())  # pack keeps CPU work off free GPUs


# --------------------------------------------------------------------------- NVLink / gangs


@pytest.mark.parametrize(
    ("peers", "expected"),
    [
        # pack ranks GPUs 0, 2 (40 GiB) before 1, 3 (80 GiB); only 0-1 and 2-3 are linked
        ({0: (1,), 1: (0,), 2: (3,), 3: (2,)}, (0, 1)),
        ({0: (1,), 2: (3,)}, (0, 1)),  # a link reported by one end only
        ({}, (0, 2)),  # topology unknown: plain best fit
        ({0: (2,), 2: (0,)}, (0, 2)),
    ],
)
def test_nvlink_peers_preferred(
    make_gpu: Callable[..., GpuReading],
    make_node: Callable[..., NodeReading],
    make_demand: Callable[..., Demand],
    peers: dict[int, tuple[int, ...]],
    expected: tuple[int, ...],
) -> None:
    gpus = [
        make_gpu(i, free_gib=40 if i % 2 == 0 else 80, peers=peers.get(i, ())) for i in range(4)
    ]
    decision = only(
        place(ClusterSnapshot((make_node(gpus=gpus),)), [make_demand(gpus=2)], NO_HEADROOM)
    )
    assert decision.placement[0].gpu_indices == expected


def test_node_with_an_nvlink_set_beats_a_tighter_fit(
    make_gpu: Callable[..., GpuReading],
    make_node: Callable[..., NodeReading],
    make_demand: Callable[..., Demand],
) -> None:
    linked = make_node("node-b", gpus=[make_gpu(i, peers=(1 - i,)) for i in range(2)] + [_gpu(2)])
    plain = make_node("node-a", gpus=2)
    decision = only(place(ClusterSnapshot((plain, linked)), [make_demand(gpus=2)], NO_HEADROOM))
    assert decision.placement[0].node_id == "node-b"
    assert decision.placement[0].gpu_indices == (0, 1)


def test_gang_needs_all_gpus_on_one_node(
    make_node: Callable[..., NodeReading], make_demand: Callable[..., Demand]
) -> None:
    snapshot = ClusterSnapshot((make_node("node-a", gpus=2), make_node("node-b", gpus=2)))
    decision = only(place(snapshot, [make_demand(gpus=4)], NO_HEADROOM))
    assert not decision.placed
    assert decision.reasons == (
        "node-a: needs 4 GPUs with ≥ 10.0 GiB free; has 2",
        "node-b: needs 4 GPUs with ≥ 10.0 GiB free; has 2",
    )
    four = ClusterSnapshot((make_node("node-c", gpus=4),))
    (p,) = only(place(four, [make_demand(gpus=4)], NO_HEADROOM)).placement
    assert p.gpu_indices == (0, 1, 2, 3)
    assert p.gpu_uuids == tuple(uuid("node-c", i) for i in range(4))


def test_multi_node_is_all_or_nothing(
    make_node: Callable[..., NodeReading], make_demand: Callable[..., Demand]
) -> None:
    nodes = (make_node("node-a", gpus=2), make_node("node-b", gpus=1), make_node("node-c", gpus=1))
    gang = make_demand(job_id="gang", gpus=2, nodes=2)
    small = make_demand(job_id="small", gpus=2)
    g, s = place(ClusterSnapshot(nodes), [gang, small], NO_HEADROOM)
    assert not g.placed
    assert g.reasons == (
        "node-a: fits (1 of the 2 nodes needed qualify)",
        "node-b: needs 2 GPUs with ≥ 10.0 GiB free; has 1 (1 of the 2 nodes needed qualify)",
        "node-c: needs 2 GPUs with ≥ 10.0 GiB free; has 1 (1 of the 2 nodes needed qualify)",
    )
    assert s.placement[0].node_id == "node-a"  # the failed gang consumed nothing
    both = (make_node("node-a", gpus=2), make_node("node-b", gpus=2), make_node("node-c", gpus=4))
    placed = only(place(ClusterSnapshot(both), [gang], NO_HEADROOM))
    assert [p.node_id for p in placed.placement] == ["node-a", "node-b"]  # pack: fullest
    assert all(len(p.gpu_indices) == 2 for p in placed.placement)


# --------------------------------------------------------------------------- host resources


@pytest.mark.parametrize(
    ("demand_kw", "text"),
    [
        ({"cpus": 4.0}, "node-a: needs 4 CPUs; 2 free"),
        ({"cpus": 2.5}, "node-a: needs 2.5 CPUs; 2 free"),
        (
            {"cpus": 1.0, "memory_bytes": 64 * GIB},
            "node-a: needs 64.0 GiB host memory; 32.0 GiB free",
        ),
        (
            {"cpus": 3.0, "memory_bytes": 40 * GIB, "gpus": 2},
            "node-a: needs 2 GPUs with ≥ 10.0 GiB free; has 1 (GPU 0: held by old); "
            "needs 3 CPUs; 2 free; needs 40.0 GiB host memory; 32.0 GiB free",
        ),
    ],
)
def test_cpu_and_host_memory(
    make_node: Callable[..., NodeReading],
    make_demand: Callable[..., Demand],
    demand_kw: dict[str, Any],
    text: str,
) -> None:
    node = make_node(gpus=2, cpus=8, memory_gib=64)
    held = hold("old", "node-a", 0, cpus=6.0, memory_bytes=32 * GIB)
    decision = only(
        place(ClusterSnapshot((node,), (held,)), [make_demand(**demand_kw)], NO_HEADROOM)
    )
    assert decision.reasons == (text,)
    ok = make_demand(cpus=2.0, memory_bytes=32 * GIB)
    assert only(place(ClusterSnapshot((node,), (held,)), [ok], NO_HEADROOM)).placed


def test_cpu_float_sums_do_not_refuse_by_rounding(make_node: Callable[..., NodeReading]) -> None:
    node = make_node(gpus=3, cpus=1)
    demands = [_demand(job_id=f"j{i}", cpus=c) for i, c in enumerate((0.1, 0.2, 0.7))]
    assert all(d.placed for d in place(ClusterSnapshot((node,)), demands, NO_HEADROOM))


# --------------------------------------------------------------------------- reasons, memo


def test_reason_texts_carry_the_numbers(
    make_gpu: Callable[..., GpuReading],
    make_node: Callable[..., NodeReading],
    make_demand: Callable[..., Demand],
) -> None:
    gpus = [make_gpu(i, free_gib=f) for i, f in enumerate((80, 80, 80, 35.7))]
    snapshot = ClusterSnapshot(
        (make_node("node-b", gpus=gpus),), (hold("j7", "node-b", 0), hold("j8", "node-b", 1, 2))
    )
    decision = only(place(snapshot, [make_demand(gpus=2, gpu_gib=40)], PlacementPolicy()))
    assert decision.reasons == (
        "node-b: needs 2 GPUs with ≥ 40.0 GiB free; has 0 "
        "(GPU 0: held by j7, GPU 1: held by j8, GPU 2: held by j8, GPU 3: 35.2 GiB free)",
    )
    assert explain(decision) == f"job-1: not placed\n  {decision.reasons[0]}"


def test_reasons_follow_the_cluster_within_a_pass(
    make_node: Callable[..., NodeReading], make_demand: Callable[..., Demand]
) -> None:
    """The per-shape memo must not hand out texts from before a placement."""
    snapshot = ClusterSnapshot((make_node(gpus=2),))
    big = [make_demand(job_id=f"big{i}", gpus=3) for i in range(3)]
    small = make_demand(job_id="small")
    d = place(snapshot, [big[0], big[1], small, big[2]], NO_HEADROOM)
    assert d[0].reasons == d[1].reasons == ("node-a: needs 3 GPUs with ≥ 10.0 GiB free; has 2",)
    assert d[3].reasons == (
        "node-a: needs 3 GPUs with ≥ 10.0 GiB free; has 1 (GPU 0: held by small)",
    )
    replica = make_demand(job_id="r0", shared=True)
    big_replica = make_demand(job_id="r-big", shared=True, gpu_gib=30)
    held = ClusterSnapshot(
        (make_node(gpus=[_gpu(free_gib=24)]),), (hold("r", "node-a", 0, shared=True),)
    )
    r = place(held, [big_replica, replica, big_replica], NO_HEADROOM)
    assert r[0].reasons == (
        "node-a: needs 1 GPU with ≥ 30.0 GiB free to share; has 0 (GPU 0: 16.0 GiB free)",
    )
    assert r[1].placed
    assert r[2].reasons == (
        "node-a: needs 1 GPU with ≥ 30.0 GiB free to share; has 0 (GPU 0: 6.0 GiB free)",
    )
    r = place(held, [make_demand(job_id="x"), replica, make_demand(job_id="x")], NO_HEADROOM)
    assert r[0].reasons == ("node-a: needs 1 GPU with ≥ 10.0 GiB free; has 0 (GPU 0: shared by r)",)
    assert r[2].reasons == (
        "node-a: needs 1 GPU with ≥ 10.0 GiB free; has 0 (GPU 0: shared by r +1 more)",
    )


def test_empty_cluster_and_unknown_holdings(make_demand: Callable[..., Demand]) -> None:
    decision = only(place(ClusterSnapshot(()), [make_demand()], PlacementPolicy()))
    assert decision.reasons == ("the cluster snapshot has no nodes",)
    gone = hold("old", "node-gone", 0)
    snapshot = ClusterSnapshot((_node(gpus=1),), (gone,))
    assert only(place(snapshot, [make_demand()], PlacementPolicy())).placed


def test_explain_placed(make_node: Callable[..., NodeReading]) -> None:
    d = only(place(ClusterSnapshot((make_node(gpus=2),)), [_demand(gpus=2)], NO_HEADROOM))
    assert d.placed and d.reasons == ()
    assert explain(d) == "job-1: placed\n  node-a: GPUs 0, 1"


def test_duplicate_node_ids_are_refused(make_node: Callable[..., NodeReading]) -> None:
    with pytest.raises(ValueError, match="twice"):
        place(ClusterSnapshot((make_node(), make_node())), [], PlacementPolicy())


# --------------------------------------------------------------------------- determinism etc.


def test_deterministic_and_independent_of_node_order() -> None:
    rng = random.Random(3)
    nodes = [
        _node(f"n{i}", gpus=[_gpu(j, free_gib=rng.choice([16, 40, 80])) for j in range(4)])
        for i in range(6)
    ]
    demands = [_demand(job_id=f"j{i}", gpus=rng.choice([1, 2]), gpu_gib=20) for i in range(20)]
    for strategy in ("pack", "spread"):
        policy = PlacementPolicy(strategy=strategy)
        first = place(ClusterSnapshot(tuple(nodes)), demands, policy)
        assert place(ClusterSnapshot(tuple(nodes)), demands, policy) == first
        assert place(ClusterSnapshot(tuple(reversed(nodes))), demands, policy) == first


def test_with_placements_and_fragmentation(make_node: Callable[..., NodeReading]) -> None:
    snapshot = ClusterSnapshot((make_node("node-a", gpus=2), make_node("node-b", gpus=2)))
    assert fragmentation(snapshot, NO_HEADROOM) == 0.0
    demands = [_demand()]
    after = with_placements(snapshot, demands, place(snapshot, demands, NO_HEADROOM))
    assert after.holdings == (hold("job-1", "node-a", 0, gib=10),)
    assert fragmentation(after, NO_HEADROOM) == pytest.approx(1 / 3)
    # the next pass sees the holding: the GPU is taken
    again = only(place(after, [_demand(job_id="job-2")], NO_HEADROOM))
    assert again.placement[0].gpu_indices == (1,)
    with pytest.raises(ValueError):
        with_placements(snapshot, demands, [])


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
