"""Placement rules, table-driven: which GPUs and nodes may take a demand, and why not.

Pure: no Ray, no network. Memory headroom and holdings, GPU eligibility and type,
exclusive vs shared use, host CPUs and memory, and the reason texts. Inputs come
from tests/unit/placement_factories.py and the ``make_*`` fixtures in conftest.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest

from scheduler.core.model import ClusterSnapshot, Demand, Holding, NodePlacement, PlacementPolicy
from scheduler.core.placement import explain, node_labels, place
from tests.unit.placement_factories import (
    GIB,
    NO_HEADROOM,
    _demand,
    _gpu,
    _node,
    hold,
    only,
    uuid,
)
from workers.interface.telemetry import GpuProcess, GpuReading, NodeReading

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


def test_nodes_are_labelled_by_hostname_with_an_id_prefix_where_hostnames_repeat() -> None:
    twins = [
        dataclasses.replace(_node("aaaaaaaaaa01"), hostname="box"),
        dataclasses.replace(_node("bbbbbbbbbb02"), hostname="box"),
        dataclasses.replace(_node("cccccccccc03"), hostname="solo"),
    ]
    assert node_labels(twins) == {
        "aaaaaaaaaa01": "box/aaaaaaaa",
        "bbbbbbbbbb02": "box/bbbbbbbb",
        "cccccccccc03": "solo",
    }
