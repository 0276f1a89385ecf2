"""GPU memory caps: the watchdog's policy (pure, clock passed in), the registry, and the
watchdog stopping real processes on simulated and (fake) NVML readings."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests.fakes.fake_pynvml import FakeGpu, FakePynvml
from workers.interface.telemetry import GIB, GpuProcess, GpuReading, GpuUuid
from workers.memory_caps import (
    CONTEXT_ALLOWANCE_BYTES,
    CapRecord,
    CapWatchdog,
    caps_dir,
    job_verdict,
    judge,
    live_caps,
    register_cap,
    register_replica,
    release_replica,
    remove_caps,
    replica_verdict,
)
from workers.nvml_backend import NvmlBackend
from workers.sim_backend import SimGpuSpec, SimNodeSpec, SimulatedBackend, write_usage

REASON = "used 23.1 GiB on GPU 1, asked for 8 GiB; raise resources.gpu_memory_gb"


def _cap(pid: int = 7, gpus: tuple[int, ...] = (1,), cap_gib: float = 8) -> CapRecord:
    return CapRecord(
        kind="job",
        owner_id="j-1",
        pid=pid,
        gpu_indices=gpus,
        cap_bytes_per_gpu=int(cap_gib * GIB),
        verdict_path="unused",
    )


def _gpu(index: int, *procs: tuple[int, float]) -> GpuReading:
    return GpuReading(
        index=index,
        uuid=GpuUuid(f"GPU-{index}"),
        name="A100",
        memory_total_bytes=40 * GIB,
        memory_used_bytes=0,
        memory_free_bytes=40 * GIB,
        util_pct=0.0,
        memory_util_pct=0.0,
        temperature_c=30.0,
        power_w=50.0,
        processes=tuple(GpuProcess(pid, int(gib * GIB)) for pid, gib in procs),
    )


def test_a_process_over_its_cap_is_stopped_once_the_grace_has_passed() -> None:
    gpus = [_gpu(0), _gpu(1, (7, 23.1))]
    stop, state = judge([_cap()], gpus, 100.0, {}, grace_s=4.0)
    assert stop == [] and state == {"j-1@7": 100.0}
    stop, state = judge([_cap()], gpus, 102.0, state, grace_s=4.0)
    assert stop == [] and state == {"j-1@7": 100.0}
    stop, state = judge([_cap()], gpus, 104.0, state, grace_s=4.0)
    assert [(s.gpu_index, s.cap.pid) for s in stop] == [(1, 7)]
    assert stop[0].reason == REASON
    assert state == {}


def test_going_back_under_the_cap_restarts_the_grace() -> None:
    over, under = [_gpu(1, (7, 23.1))], [_gpu(1, (7, 7.5))]
    _, state = judge([_cap()], over, 0.0, {}, grace_s=4.0)
    stop, state = judge([_cap()], under, 2.0, state, grace_s=4.0)
    assert stop == [] and state == {}
    stop, state = judge([_cap()], over, 4.0, state, grace_s=4.0)
    assert stop == [] and state == {"j-1@7": 4.0}
    stop, _ = judge([_cap()], over, 8.0, state, grace_s=4.0)
    assert len(stop) == 1


def test_the_cuda_context_allowance_is_not_an_overuse() -> None:
    at_limit = 8 * GIB + CONTEXT_ALLOWANCE_BYTES
    reading = [replace(_gpu(1), processes=(GpuProcess(7, at_limit),))]
    assert judge([_cap()], reading, 0.0, {}, grace_s=0.0)[0] == []
    over = [replace(_gpu(1), processes=(GpuProcess(7, at_limit + 1),))]
    assert len(judge([_cap()], over, 0.0, {}, grace_s=0.0)[0]) == 1


@pytest.mark.parametrize(
    ("used_gib", "cap_gib", "gpu", "text"),
    [
        (23.1, 8, 1, "used 23.1 GiB on GPU 1, asked for 8 GiB"),
        (4.26, 0.5, 0, "used 4.3 GiB on GPU 0, asked for 0.5 GiB"),
        (30.0, 12.25, 3, "used 30.0 GiB on GPU 3, asked for 12.25 GiB"),
    ],
)
def test_the_reason_names_the_use_the_gpu_and_the_request(
    used_gib: float, cap_gib: float, gpu: int, text: str
) -> None:
    stop, _ = judge(
        [_cap(gpus=(gpu,), cap_gib=cap_gib)], [_gpu(gpu, (7, used_gib))], 0.0, {}, grace_s=0.0
    )
    assert stop[0].reason == f"{text}; raise resources.gpu_memory_gb"


def test_only_the_capped_process_on_its_own_gpus_counts() -> None:
    cap = _cap(gpus=(0, 1))
    # Another process over 8 GiB, and this process on a GPU it was not given: not judged.
    gpus = [_gpu(0, (7, 2.0), (8, 30.0)), _gpu(1, (7, 12.0)), _gpu(2, (7, 30.0))]
    stop, _ = judge([cap], gpus, 0.0, {}, grace_s=0.0)
    assert [(s.gpu_index, round(s.used_bytes / GIB)) for s in stop] == [(1, 12)]
    # Unknown per-process memory (NVML without permission) is never taken for an overuse.
    unknown = [replace(_gpu(1), processes=(GpuProcess(7, None),))]
    assert judge([cap], unknown, 0.0, {}, grace_s=0.0)[0] == []


# -- the registry ----------------------------------------------------------------------------


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A live process leading its own process group, as a job process does."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True
    )
    yield proc
    proc.kill()
    proc.wait()


def test_the_registry_keeps_caps_of_live_processes_only(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    registry = caps_dir(tmp_path / "node")
    register_cap(registry, "job", "j-1", sleeper.pid, [1], 8 * GIB, tmp_path / "v.json")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    register_cap(registry, "job", "j-2", dead.pid, [0], GIB, tmp_path / "w.json")
    assert [(c.owner_id, c.pid) for c in live_caps(registry)] == [("j-1", sleeper.pid)]
    assert [p.name for p in registry.iterdir()] == [f"j-1@{sleeper.pid}.cap.json"]
    assert remove_caps(registry, "j-1") == 1 and live_caps(registry) == []


def test_a_recycled_pid_is_never_held_to_the_old_processs_cap(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    registry = caps_dir(tmp_path)
    path = register_cap(registry, "job", "j-1", sleeper.pid, [1], GIB, tmp_path / "v.json")
    record = CapRecord.from_json(json.loads(path.read_text()))
    assert record.pid_start_ticks is not None  # Linux: /proc/<pid>/stat
    path.write_text(json.dumps(replace(record, pid_start_ticks=1).to_json()))
    assert live_caps(registry) == [] and not path.exists()
    watchdog = CapWatchdog(registry, grace_s=0.0)
    assert watchdog.check([_gpu(1, (sleeper.pid, 30.0))], 0.0) == []
    assert sleeper.poll() is None


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "[]",
        '{"format": 1, "kind": "job"}',
        '{"format": 1, "kind": "nobody", "owner_id": "j-1", "pid": 1, "gpu_indices": [0], '
        '"cap_bytes_per_gpu": 1, "verdict_path": "v"}',
        '{"format": 1, "kind": "job", "owner_id": "j-1", "pid": 1, "gpu_indices": [0], '
        '"cap_bytes_per_gpu": 0, "verdict_path": "v"}',
    ],
)
def test_an_unreadable_cap_file_is_dropped(tmp_path: Path, text: str) -> None:
    registry = caps_dir(tmp_path)
    (registry / "j-1@1.cap.json").write_text(text)
    assert live_caps(registry) == [] and list(registry.iterdir()) == []


# -- the watchdog stopping real processes --------------------------------------------------


def test_the_watchdog_stops_a_job_over_its_cap_on_simulated_gpus(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    node = SimNodeSpec(
        name="n", cpus=2, memory_gb=8, gpus=[SimGpuSpec(type="A100", memory_gb=40, count=2)]
    )
    usage = tmp_path / "usage"
    backend = SimulatedBackend(node, usage)
    work_dir = tmp_path / "work"
    work_dir.mkdir()
    registry = caps_dir(tmp_path / "node")
    register_cap(registry, "job", "j-1", sleeper.pid, [1], 8 * GIB, work_dir / "cap_verdict.json")
    watchdog = CapWatchdog(registry, grace_s=4.0)
    write_usage(usage, "j-1", sleeper.pid, [1], 8 * GIB)  # what it asked for: fine
    assert watchdog.check(backend.read(), 0.0) == []
    write_usage(usage, "j-1", sleeper.pid, [1], int(23.1 * GIB))  # the job "allocates"
    assert watchdog.check(backend.read(), 10.0) == []
    assert sleeper.poll() is None and job_verdict(work_dir) is None
    stopped = watchdog.check(backend.read(), 14.0)
    assert [s.cap.owner_id for s in stopped] == ["j-1"]
    assert sleeper.wait(timeout=30) == -9
    assert job_verdict(work_dir) == REASON
    assert list(registry.iterdir()) == []


def test_the_watchdog_stops_a_replica_over_its_cap_on_nvml_readings(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    fake = FakePynvml([FakeGpu(processes=[(sleeper.pid, 10 * GIB)])])
    node_dir = str(tmp_path / "node")
    register_replica(node_dir, "r-1", sleeper.pid, (0,), 4 * GIB)
    assert replica_verdict(node_dir, "r-1") is None
    CapWatchdog(caps_dir(node_dir), grace_s=0.0).check(NvmlBackend(fake).read(), 0.0)
    assert sleeper.wait(timeout=30) == -9
    assert replica_verdict(node_dir, "r-1") == (
        "used 10.0 GiB on GPU 0, asked for 4 GiB; raise resources.gpu_memory_gb"
    )
    release_replica(node_dir, "r-1")
    assert replica_verdict(node_dir, "r-1") is None


def test_whole_gpus_and_cpu_only_replicas_get_no_cap(tmp_path: Path) -> None:
    node_dir = str(tmp_path / "node")
    register_replica(node_dir, "r-1", 1, (), 4 * GIB)
    register_replica(None, "r-2", 1, (0,), 4 * GIB)
    assert live_caps(caps_dir(node_dir)) == []
