"""``jobworker top``'s pure renderers, drawn to a recording console."""

from __future__ import annotations

from typing import Any

from rich.console import Console, RenderableType

from scheduler.cli.cluster_view import frame, gpu_map, holder_names, memory_bar, queue_table
from workers.interface.telemetry import GIB

NOW = 10_000.0


def _text(renderable: RenderableType, width: int = 200) -> str:
    console = Console(record=True, width=width, color_system=None)
    console.print(renderable)
    return console.export_text()


def _gpu(index: int, **over: Any) -> dict[str, Any]:
    gpu = {
        "index": index,
        "uuid": f"GPU-{index}",
        "name": "NVIDIA A100-SXM4-40GB",
        "memory_total_bytes": 40 * GIB,
        "memory_used_bytes": 0,
        "memory_free_bytes": 40 * GIB,
        "util_pct": 0.0,
        "temperature_c": 31.0,
        "available": True,
        "jobs": [],
    }
    return gpu | over


CLUSTER = {
    "nodes": [
        {
            "hostname": "sim-a",
            "jobs": ["j-train"],
            "gpus": [
                _gpu(
                    0,
                    memory_used_bytes=30 * GIB,
                    util_pct=87.0,
                    temperature_c=64.0,
                    jobs=["j-train"],
                    replicas=["mlp-serve"],
                    holders=[
                        {"kind": "job", "id": "j-train", "memory_bytes": 20 * GIB},
                        {"kind": "replica", "id": "mlp-serve", "memory_bytes": 8 * GIB},
                        {"kind": "outside", "id": None, "memory_bytes": 2 * GIB},
                    ],
                ),
                _gpu(1, available=False, memory_used_bytes=None, util_pct=None),
            ],
        },
        {"hostname": "cpu-only", "jobs": [], "gpus": []},
    ]
}


def test_memory_bar_draws_each_share_in_proportion_then_free() -> None:
    styles = {"a": "red", "b": "blue"}
    bar = memory_bar([("a", 10), ("b", 5)], 40, styles, width=8)
    assert bar.plain == "██" + "█" + "░" * 5
    assert [(s.start, s.end, s.style) for s in bar.spans][:2] == [(0, 2, "red"), (2, 3, "blue")]
    assert memory_bar([], 0, styles, width=4).plain == "░░░░", "an unknown total draws all free"


def test_gpu_map_shows_holders_util_temperature_and_lost_gpus() -> None:
    text = _text(gpu_map(CLUSTER))
    row0 = next(line for line in text.splitlines() if "sim-a" in line)
    assert " A100-SXM4-40GB " in row0 and "NVIDIA" not in text, "the vendor is not repeated"
    assert "j-train, replica:mlp-serve, outside" in row0
    assert "30.0/40" in row0 and "87" in row0 and "64" in row0
    assert row0.count("█") == 12 and row0.count("░") == 4, "20 + 8 + 2 of 40 GiB in 16 chars"
    row1 = next(line for line in text.splitlines() if "lost" in line)
    assert "unavailable" in row1
    assert "cpu-only" in text and "no GPUs" in text


def test_gpu_map_without_holders_draws_the_used_memory_and_names_jobs_and_replicas() -> None:
    bare = {
        "nodes": [
            {
                "hostname": "old-api",
                "jobs": ["j1"],
                "gpus": [_gpu(0, memory_used_bytes=10 * GIB, jobs=["j1"], replicas=["r"])],
            }
        ]
    }
    row = next(line for line in _text(gpu_map(bare)).splitlines() if "old-api" in line)
    assert row.count("█") == 4 and "j1, replica:r" in row


def test_holder_names_lists_jobs_then_replicas() -> None:
    assert holder_names({"jobs": ["a"], "replicas": ["srv"]}) == ["a", "replica:srv"]
    assert holder_names({"jobs": []}) == []


def test_queue_table_in_order_with_waiting_time_reason_and_predicted_start() -> None:
    entries = [
        {
            "position": 1,
            "job_id": "j-urgent",
            "name": "urgent",
            "team": "vision",
            "priority": 5,
            "submitted_at": NOW - 300,
            "reasons": ["sim-a: needs 30 GiB free on 1 GPU, best has 10"],
            "predicted_start_at": NOW + 12 * 60,
        },
        {
            "position": 2,
            "job_id": "j-later",
            "name": "later",
            "team": "nlp",
            "priority": 0,
            "submitted_at": NOW - 30,
            "reasons": ["quota"],
        },
    ]
    text = _text(queue_table(entries, NOW))
    assert text.index("j-urgent") < text.index("j-later")
    urgent = next(line for line in text.splitlines() if "j-urgent" in line)
    assert "vision" in urgent and "5 min" in urgent and "starts in ~12 min" in urgent
    assert "needs 30 GiB" in urgent
    later = next(line for line in text.splitlines() if "j-later" in line)
    assert "30 s" in later and "quota" in later
    assert "no pending jobs" in _text(queue_table([], NOW))


def test_frame_holds_the_map_above_the_queue() -> None:
    text = _text(frame(CLUSTER, [], NOW))
    assert text.index("GPUs") < text.index("no pending jobs")
