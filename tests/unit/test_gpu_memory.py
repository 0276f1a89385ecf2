"""``resources.gpu_memory_gb: auto``: the request sized from the family's measured peak, the
whole GPU without one, a written number never changed; what placement sees and the job holds."""

from __future__ import annotations

import dataclasses

import pytest

from scheduler.batch.demands import assignment_of, auto_gpu_memory_of, demand_of, holdings_of
from scheduler.batch.store import JobRecord
from scheduler.core.gpu_memory import auto_gpu_memory
from scheduler.core.model import ClusterSnapshot, PlacementPolicy
from scheduler.core.placement import place
from scheduler.core.predictor import Prediction
from tests.unit.job_records import pending_record
from tests.unit.placement_factories import _gpu, _node
from workers.interface.executor import LaunchRequest
from workers.interface.telemetry import GIB

NO_HEADROOM = PlacementPolicy(memory_headroom_bytes=0)


def prediction(peak_gb: float | None, samples: int = 3, basis: str = "name:t") -> Prediction:
    return Prediction(600.0, 500.0, 700.0, peak_gb, basis, samples)


def job(gpu_memory: str, gpus: int = 1) -> JobRecord:
    text = (
        "name: t\nmodel: {name: mlp}\ntrain: {max_steps: 3}\n"
        f"resources: {{gpus: {gpus}, gpu_memory_gb: {gpu_memory}}}\n"
    )
    return pending_record(text, "j-1")


@pytest.mark.parametrize(
    ("peak_gb", "asked_gb"),
    [
        (9.3, 10.5),  # 10.23 rounded up to the next half GiB
        (10.0, 11.0),  # exactly 11: no extra step for float noise
        (2.5, 3.0),  # 2.75
        (0.01, 0.5),  # never below one step
        (0.0, 0.5),
        (40.0, 44.0),
    ],
)
def test_the_request_is_the_peak_plus_a_tenth_rounded_up_to_half_a_gib(
    peak_gb: float, asked_gb: float
) -> None:
    auto = auto_gpu_memory(prediction(peak_gb, samples=4, basis="name:resnet"))
    assert auto.gpu_memory_gb == asked_gb
    assert auto.gpu_memory_bytes == int(asked_gb * GIB)
    assert auto.reason == (
        f"gpu_memory_gb: auto — asking for {asked_gb:g} GiB per GPU: peak {peak_gb:.1f} GiB "
        "in the last 4 runs of name:resnet, +10%"
    )


def test_without_history_or_a_measured_peak_it_asks_for_the_whole_gpu() -> None:
    none = auto_gpu_memory(None)
    assert none.gpu_memory_gb is None and none.gpu_memory_bytes == 0
    assert none.reason == (
        "gpu_memory_gb: auto — no finished runs of this family yet, asking for the whole GPU"
    )
    unmeasured = auto_gpu_memory(prediction(None, samples=1, basis="team:vision"))
    assert unmeasured.gpu_memory_gb is None
    assert unmeasured.reason == (
        "gpu_memory_gb: auto — no peak GPU memory measured in the last 1 run of team:vision, "
        "asking for the whole GPU"
    )


def test_a_written_number_is_never_changed_by_a_prediction() -> None:
    asked = job("30")
    assert auto_gpu_memory_of(asked, prediction(2.0)) is None
    assert demand_of(asked).gpu_memory_bytes == 30 * GIB
    # Even an `auto` value handed in by mistake does not change it.
    assert demand_of(asked, auto_gpu_memory(prediction(2.0))).gpu_memory_bytes == 30 * GIB


def test_an_auto_job_asks_placement_for_its_sized_request() -> None:
    auto_job = job("auto")
    auto = auto_gpu_memory_of(auto_job, prediction(20.0))
    assert auto is not None and auto.gpu_memory_gb == 22.0
    demand = demand_of(auto_job, auto)
    assert demand.gpu_memory_bytes == 22 * GIB
    # GPU 0 has 20 GiB free (an outside tenant holds the rest), GPU 1 has 30: only 1 fits.
    node = _node(gpus=[_gpu(0, total_gib=40, free_gib=20), _gpu(1, total_gib=40, free_gib=30)])
    (decision,) = place(ClusterSnapshot(nodes=(node,)), [demand], NO_HEADROOM)
    assert decision.placed and decision.placement[0].gpu_indices == (1,)

    assignment = assignment_of(decision, {node.node_id: node}, auto)
    assert assignment.leader.gpu_memory_bytes == 22 * GIB
    placed = dataclasses.replace(auto_job, assignment=assignment)
    assert [h.gpu_memory_bytes for h in holdings_of(placed)] == [22 * GIB]


def test_an_auto_job_without_history_holds_the_whole_free_gpu() -> None:
    auto_job = job("auto", gpus=2)
    auto = auto_gpu_memory_of(auto_job, None)
    assert auto is not None
    assert demand_of(auto_job, auto).gpu_memory_bytes == 0
    assert demand_of(auto_job).gpu_memory_bytes == 0  # a loop that passes nothing: the same
    node = _node(gpus=[_gpu(0, total_gib=40, free_gib=31), _gpu(1, total_gib=40, free_gib=40)])
    (decision,) = place(ClusterSnapshot(nodes=(node,)), [demand_of(auto_job, auto)], NO_HEADROOM)
    assignment = assignment_of(decision, {node.node_id: node}, auto)
    assert assignment.leader.gpu_memory_bytes == 31 * GIB  # the least free of its two GPUs
    placed = dataclasses.replace(auto_job, assignment=assignment)
    assert [h.gpu_memory_bytes for h in holdings_of(placed)] == [31 * GIB]
    launch = LaunchRequest(
        job_id="j-1",
        attempt=1,
        node=assignment.leader,
        spec=auto_job.spec,
        source_text=auto_job.source_text,
        tracking_uri="sqlite:///unused.db",
    )
    # What the job process declares on simulated GPUs, and what survives launch.json.
    again = LaunchRequest.model_validate_json(launch.model_dump_json())
    assert again.node.held_gpu_memory_bytes(again.spec) == 31 * GIB


def test_a_numeric_job_holds_what_it_asked_for() -> None:
    asked = job("12")
    node = _node(gpus=1)
    (decision,) = place(ClusterSnapshot(nodes=(node,)), [demand_of(asked)], NO_HEADROOM)
    assignment = assignment_of(decision, {node.node_id: node})
    assert assignment.leader.gpu_memory_bytes is None
    placed = dataclasses.replace(asked, assignment=assignment)
    assert [h.gpu_memory_bytes for h in holdings_of(placed)] == [12 * GIB]
