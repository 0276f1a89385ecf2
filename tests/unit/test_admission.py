"""Admission: a demand no node could ever hold, were the cluster empty, is told apart."""

from __future__ import annotations

import pytest

from scheduler.core.admission import never_fits
from scheduler.core.model import Demand, PlacementPolicy
from tests.unit.placement_factories import NO_HEADROOM, _demand, _gpu, _node
from workers.interface.telemetry import GIB, GpuProcess

# Two 2-GPU nodes of 80 GiB A100s, 64 CPUs and 512 GiB each.
CLUSTER = (_node("node-a", gpus=2), _node("node-b", gpus=2))


@pytest.mark.parametrize(
    ("demand", "fields", "words"),
    [
        (_demand(gpus=4), ("gpus",), "needs 4 GPUs with ≥ 10.0 GiB free; has 2"),
        (_demand(gpu_gib=100), ("gpu_memory_bytes",), "needs 1 GPU with ≥ 100.0 GiB free"),
        (_demand(cpus=65.0), ("cpus",), "needs 65 CPUs; 64 free"),
        (_demand(memory_bytes=600 * GIB), ("memory_bytes",), "needs 600.0 GiB host memory"),
        (_demand(gpu_type="H100"), ("gpu_type",), "no GPU of type H100"),
        (_demand(nodes=3), ("nodes",), "(2 of the 3 nodes needed qualify)"),
        # Two fields too big: relaxing either alone does not help, so neither is named.
        (_demand(gpus=4, cpus=65.0), (), "needs 65 CPUs; 64 free"),
    ],
)
def test_a_demand_no_empty_node_holds_names_the_field_and_every_node(
    demand: Demand, fields: tuple[str, ...], words: str
) -> None:
    refusal = never_fits(CLUSTER, demand, NO_HEADROOM)
    assert refusal is not None
    assert refusal.fields == fields
    assert [r.split(":")[0] for r in refusal.reasons] == ["node-a", "node-b"]
    assert all(words in r for r in refusal.reasons), refusal.reasons


def test_what_fits_an_empty_node_is_admitted_however_busy_the_cluster_is_now() -> None:
    busy = _gpu(0, free_gib=1, util=100.0, processes=(GpuProcess(7, 79 * GIB),))
    lost = _gpu(1, free_gib=None, util=None, available=False)
    nodes = (_node("node-a", gpus=[busy, lost]),)
    assert never_fits(nodes, _demand(gpus=2, gpu_gib=70), NO_HEADROOM) is None


def test_the_policys_headroom_counts() -> None:
    whole = _demand(gpu_gib=80)
    assert never_fits(CLUSTER, whole, NO_HEADROOM) is None
    refusal = never_fits(CLUSTER, whole, PlacementPolicy())  # keeps 512 MiB free per GPU
    assert refusal is not None and refusal.fields == ("gpu_memory_bytes",)


def test_with_no_node_reported_nothing_is_refused() -> None:
    assert never_fits((), _demand(gpus=64), NO_HEADROOM) is None
