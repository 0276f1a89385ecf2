"""Placement choice: among the nodes and GPUs that fit, which one a demand gets.

Pure: no Ray, no network. Pack vs spread, NVLink sets and gangs, determinism,
and feeding placements back into the snapshot. Inputs come from
tests/unit/placement_factories.py and the ``make_*`` fixtures in conftest.py.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from scheduler.core.model import ClusterSnapshot, Demand, Holding, NodePlacement, PlacementPolicy
from scheduler.core.placement import fragmentation, place, with_placements
from tests.unit.placement_factories import (
    NO_HEADROOM,
    Strategy,
    _demand,
    _gpu,
    _node,
    hold,
    only,
    uuid,
)
from workers.interface.telemetry import GpuReading, NodeReading

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
