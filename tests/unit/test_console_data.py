"""What the console's pages show: GPU shares by holder (``GET /cluster``'s table, with
each node's warm pool),
quotas used/lent/borrowed, the jobs filter and the loss sparkline."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from scheduler.api.console import data
from scheduler.api.views import cluster_table
from scheduler.batch.store import JobRecord
from scheduler.cli.jobs import pool_text
from scheduler.core.model import Holding
from scheduler.core.states import JobState
from tests.unit.job_records import pending_record
from tests.unit.placement_factories import _gpu, _node, uuid
from workers.interface.errors import ConfigError
from workers.interface.executor import Assignment, NodeAssignment, WarmPoolStatus
from workers.interface.telemetry import GIB, GpuUuid

REPO = Path(__file__).resolve().parents[2]
CONFIG = (REPO / "configs" / "train" / "mlp_synthetic.yaml").read_text()


def running(job_id: str, team: str, gpus: list[GpuUuid], memory_bytes: int) -> JobRecord:
    job = pending_record(CONFIG, job_id)
    placed = NodeAssignment(
        node_id="node-a",
        hostname="node-a",
        gpu_indices=tuple(range(len(gpus))),
        gpu_uuids=tuple(gpus),
        gpu_memory_bytes=memory_bytes,
    )
    return replace(job, team=team, state=JobState.RUNNING, assignment=Assignment(nodes=(placed,)))


def replica_holding(gpu: GpuUuid, memory_bytes: int) -> Holding:
    return Holding("mlp-abc123", "node-a", (gpu,), memory_bytes, cpus=1, memory_bytes=0)


def test_each_gpu_lists_its_jobs_replicas_and_the_rest_as_outside() -> None:
    node = _node("node-a", gpus=[_gpu(0, total_gib=24, free_gib=10), _gpu(1, total_gib=24)])
    job = running("job-1", "a", [uuid("node-a", 0)], 8 * GIB)
    table = cluster_table([node], [job], [("mlp", replica_holding(uuid("node-a", 0), 4 * GIB))])
    first, second = table["nodes"][0]["gpus"]
    assert first["jobs"] == ["job-1"]
    assert first["replicas"] == ["mlp"]
    assert first["holders"] == [
        {"kind": "job", "id": "job-1", "memory_bytes": 8 * GIB},
        {"kind": "replica", "id": "mlp", "memory_bytes": 4 * GIB},
        {"kind": "outside", "id": None, "memory_bytes": 2 * GIB},  # 14 used, 12 known
    ]
    assert second["jobs"] == [] and second["replicas"] == [] and second["holders"] == []
    assert table["nodes"][0]["jobs"] == ["job-1"]


def test_the_gpu_map_draws_each_share_against_the_total() -> None:
    node = _node("node-a", gpus=[_gpu(0, total_gib=20, free_gib=10), _gpu(1, available=False)])
    job = running("job-1", "a", [uuid("node-a", 0)], 5 * GIB)
    table = cluster_table([node], [job], [("mlp", replica_holding(uuid("node-a", 0), 2 * GIB))])
    (view,) = data.gpu_map(table)
    gpu, lost = view.gpus
    assert [(s.holder, s.memory_bytes, s.width_pct) for s in gpu.shares] == [
        ("job:job-1", 5 * GIB, 25.0),
        ("replica:mlp", 2 * GIB, 10.0),
        ("outside", 3 * GIB, 15.0),
    ]
    assert gpu.available and not lost.available


def test_quotas_show_what_teams_over_theirs_borrow_from_teams_under() -> None:
    gpus = [uuid("node-a", i) for i in range(8)]
    active = [running("a-1", "a", gpus[:1], GIB), running("b-1", "b", gpus[1:6], GIB)]
    rows = {r.team: r for r in data.quota_rows({"a": 4, "b": 2, "c": 0}, active)}
    assert rows["a"] == data.QuotaRow("a", 4, 1, 3, 0)
    assert rows["b"] == data.QuotaRow("b", 2, 5, 0, 3)
    assert rows["c"] == data.QuotaRow("c", 0, 0, 0, 0)


def test_without_quotas_nobody_borrows() -> None:
    active = [running("b-1", "b", [uuid("node-a", 0), uuid("node-a", 1)], GIB)]
    assert data.quota_rows({}, active) == [data.QuotaRow("b", None, 2, 0, 0)]


def test_lending_is_no_more_than_what_is_borrowed() -> None:
    active = [running("b-1", "b", [uuid("node-a", 0), uuid("node-a", 1)], GIB)]
    rows = {r.team: r for r in data.quota_rows({"a": 4, "b": 1}, active)}
    assert rows["a"].lent_gpus == 1
    assert rows["b"].borrowed_gpus == 1


def test_the_jobs_filter_keeps_matching_jobs_newest_first_up_to_the_cap() -> None:
    jobs = [pending_record(CONFIG, f"job-{i}", submitted_at=float(i)) for i in range(5)]
    jobs[3] = replace(jobs[3], team="b")
    page = data.jobs_page(jobs, data.JobFilter(team=jobs[0].team), shown=2)
    assert [j.id for j in page.jobs] == ["job-4", "job-2"]
    assert page.matching == 4
    assert page.teams == sorted({jobs[0].team, "b"})
    assert [j.id for j in data.jobs_page(jobs, data.JobFilter(q="JOB-3")).jobs] == ["job-3"]


def test_the_sparkline_spans_its_box_from_highest_to_lowest() -> None:
    assert data.sparkline([1.0]) == ""
    points = data.sparkline([3.0, 2.0, 1.0]).split()
    assert points[0] == "0.0,0.0"
    assert points[-1] == f"{data.SPARK_WIDTH:.1f},{data.SPARK_HEIGHT:.1f}"


def test_the_jobs_form_reads_empty_fields_as_any_and_refuses_an_unknown_state() -> None:
    assert data.JobFilter.from_query("", "", "") == data.JobFilter()
    assert data.JobFilter.from_query("RUNNING", "a", "x") == data.JobFilter(
        JobState.RUNNING, "a", "x"
    )
    with pytest.raises(ConfigError) as refused:
        data.JobFilter.from_query("NAPPING", "", "")
    assert refused.value.errors[0][0] == "state"


def test_each_node_shows_its_warm_pool_or_none() -> None:
    nodes = [_node("node-a", gpus=[_gpu(0)]), _node("node-b", gpus=[_gpu(0)])]
    table = cluster_table(nodes, [], [], [WarmPoolStatus("node-a", 2, 1, 512 * 2**20)])
    a, b = table["nodes"]
    assert a["pool"] == {"size": 2, "idle": 1, "idle_rss_bytes": 512 * 2**20}
    assert b["pool"] is None
    assert [pool_text(n["pool"]) for n in (a, b)] == ["1/2 idle, 0.50 GiB", "-"]
    assert pool_text({"size": 0, "idle": 0, "idle_rss_bytes": 0}) == "off"
