"""GPU telemetry backends: one contract suite over both, then each backend's own behaviour.

The NVML adapter runs on the fake ``pynvml`` module (tests/fakes/fake_pynvml.py);
``tests/gpu/test_nvml_real.py`` runs the same contract checks on real NVML.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fakes import fake_pynvml
from tests.fakes.fake_pynvml import GIB, FakeGpu, FakePynvml
from workers.errors import ClusterConfigError, NvmlUnavailable
from workers.nvml_backend import NvmlBackend
from workers.sim_backend import (
    BYTES_PER_GB,
    JOB_UTIL_INCREMENT_PCT,
    SimClusterSpec,
    SimGpuSpec,
    SimNodeSpec,
    SimulatedBackend,
    load_cluster_config,
    parse_cluster_config,
    remove_usage,
    select_backend,
    simulated_backend_for,
    write_usage,
)
from workers.telemetry import GpuBackend, GpuReading

CLUSTER_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "cluster"


# -- the contract, shared with tests/gpu ---------------------------------------------


def assert_reading_contract(readings: tuple[GpuReading, ...], expected_count: int) -> None:
    """What every backend's ``read()`` promises, whatever the hardware."""
    assert isinstance(readings, tuple)
    assert len(readings) == expected_count
    assert [r.index for r in readings] == list(range(expected_count))
    uuids = [r.uuid for r in readings]
    assert len(set(uuids)) == len(uuids), "UUIDs must be unique"
    for r in readings:
        assert isinstance(r, GpuReading)
        assert isinstance(r.uuid, str) and r.uuid
        memory = (r.memory_total_bytes, r.memory_used_bytes, r.memory_free_bytes)
        if None not in memory:
            total, used, free = memory
            assert total is not None and used is not None and free is not None
            assert total > 0 and used >= 0 and free >= 0
            assert used + free == total
        for pct in (r.util_pct, r.memory_util_pct):
            assert pct is None or 0.0 <= pct <= 100.0
        assert r.power_w is None or r.power_w >= 0
        assert len({p.pid for p in r.processes}) == len(r.processes)
        assert r.uuid not in r.nvlink_peers
        assert set(r.nvlink_peers) <= set(uuids)
    by_uuid = {r.uuid: r for r in readings}
    for r in readings:  # an NVLink is a link between two GPUs: both ends see it
        assert all(r.uuid in by_uuid[peer].nvlink_peers for peer in r.nvlink_peers)


@dataclass
class BackendCase:
    """A backend under the contract, with a hook to put a process on one of its GPUs."""

    backend: GpuBackend
    device_count: int
    add_process: Callable[[int, int, int], None]  # (gpu index, pid, bytes)


def _nvml_case(tmp_path: Path) -> BackendCase:
    fake = FakePynvml(
        [
            FakeGpu(uuid="GPU-aaaa", bus_id="00000000:01:00.0", nvlinks=["00000000:02:00.0"]),
            FakeGpu(uuid="GPU-bbbb", bus_id="00000000:02:00.0", nvlinks=["00000000:01:00.0"]),
            FakeGpu(uuid="GPU-cccc", bus_id="00000000:03:00.0", nvlink_supported=False),
        ]
    )

    def add_process(index: int, pid: int, used: int) -> None:
        fake.gpus[index].processes.append((pid, used))
        fake.gpus[index].memory_used += used

    return BackendCase(NvmlBackend(fake), 3, add_process)


def _sim_case(tmp_path: Path) -> BackendCase:
    node = SimNodeSpec(
        name="n",
        cpus=2,
        memory_gb=8,
        gpus=[
            SimGpuSpec(type="A100", memory_gb=40, count=2, nvlink=True),
            SimGpuSpec(type="T4", memory_gb=16, external_memory_gb=4, background_util_pct=10),
        ],
    )

    def add_process(index: int, pid: int, used: int) -> None:
        write_usage(tmp_path, f"job-{index}", pid, [index], used)

    return BackendCase(SimulatedBackend(node, usage_dir=tmp_path), 3, add_process)


@pytest.fixture(params=[_nvml_case, _sim_case], ids=["nvml-fake", "simulated"])
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BackendCase]:
    built: BackendCase = request.param(tmp_path)
    yield built
    built.backend.close()


def test_contract_holds_on_a_fresh_read(case: BackendCase) -> None:
    assert_reading_contract(case.backend.read(), case.device_count)
    assert case.backend.name in ("nvml", "simulated")


def test_every_declared_device_is_available_and_named(case: BackendCase) -> None:
    for reading in case.backend.read():
        assert reading.available
        assert reading.name
        assert reading.memory_total_bytes is not None and reading.util_pct is not None


def test_uuids_are_stable_across_reads_and_close(case: BackendCase) -> None:
    first = [r.uuid for r in case.backend.read()]
    assert [r.uuid for r in case.backend.read()] == first
    case.backend.close()
    assert [r.uuid for r in case.backend.read()] == first


def test_close_then_read_works_again_and_close_is_idempotent(case: BackendCase) -> None:
    case.backend.read()
    case.backend.close()
    case.backend.close()
    assert_reading_contract(case.backend.read(), case.device_count)


def test_a_process_on_a_gpu_is_listed_with_its_memory(case: BackendCase) -> None:
    before = case.backend.read()[1]
    case.add_process(1, os.getpid(), 2 * GIB)
    after = case.backend.read()
    assert_reading_contract(after, case.device_count)
    assert [p.pid for p in after[1].processes] == [os.getpid()]
    assert after[1].processes[0].used_memory_bytes == 2 * GIB
    assert before.memory_used_bytes is not None and after[1].memory_used_bytes is not None
    assert after[1].memory_used_bytes - before.memory_used_bytes == 2 * GIB
    assert after[0].processes == () and after[2].processes == ()


def test_nvlink_peers_are_the_linked_local_gpus(case: BackendCase) -> None:
    gpu0, gpu1, gpu2 = case.backend.read()
    assert gpu0.nvlink_peers == (gpu1.uuid,)
    assert gpu1.nvlink_peers == (gpu0.uuid,)
    assert gpu2.nvlink_peers == ()


# -- NVML adapter on the fake module ----------------------------------------------------


def make_fake(count: int = 2, **gpu: Any) -> FakePynvml:
    """A fake driver with ``count`` devices on distinct PCI buses; ``gpu`` sets their fields."""
    return FakePynvml(
        [
            FakeGpu(uuid=f"GPU-{i:04d}", bus_id=f"00000000:{i + 1:02X}:00.0", **gpu)
            for i in range(count)
        ]
    )


def test_fake_matches_the_real_pynvml_signatures_and_constants() -> None:
    pynvml = pytest.importorskip("pynvml")
    for name, member in vars(FakePynvml).items():
        if name.startswith("nvml"):
            fake_params = list(inspect.signature(member).parameters)[1:]  # drop self
            assert fake_params == list(inspect.signature(getattr(pynvml, name)).parameters), name
        elif name.startswith("NVML_"):
            assert member == getattr(pynvml, name), name
    for name, value in vars(fake_pynvml).items():
        if name.startswith("NVML_"):
            assert value == getattr(pynvml, name), name


def test_fake_refuses_calls_before_init_like_the_real_library() -> None:
    fake = make_fake()
    with pytest.raises(fake_pynvml.NVMLError) as info:
        fake.nvmlDeviceGetCount()
    assert info.value.value == fake_pynvml.NVML_ERROR_UNINITIALIZED


def test_nvml_starts_lazily_once_and_shuts_down_on_close() -> None:
    fake = make_fake()
    backend = NvmlBackend(fake)
    assert fake.calls == []  # the constructor touches no driver
    backend.read()
    backend.read()
    assert fake.calls.count("nvmlInit") == 1
    backend.close()
    assert fake.refcount == 0 and fake.calls[-1] == "nvmlShutdown"
    backend.read()
    assert fake.calls.count("nvmlInit") == 2


def test_nvml_restarts_when_someone_else_shut_it_down() -> None:
    fake = make_fake()
    backend = NvmlBackend(fake)
    backend.read()
    fake.refcount = 0  # another pynvml user in the process called nvmlShutdown
    assert len(backend.read()) == 2


@pytest.mark.parametrize(
    "code", [fake_pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, fake_pynvml.NVML_ERROR_DRIVER_NOT_LOADED]
)
def test_init_failure_is_nvml_unavailable_with_the_code(code: int) -> None:
    backend = NvmlBackend(FakePynvml([FakeGpu()], init_error=code))
    with pytest.raises(NvmlUnavailable) as info:
        backend.read()
    assert info.value.code == code
    assert "nvmlInit" in str(info.value)


def test_driver_gone_mid_run_is_nvml_unavailable() -> None:
    fake = make_fake()
    backend = NvmlBackend(fake)
    backend.read()
    fake.gpus[0].faults["nvmlDeviceGetMemoryInfo"] = fake_pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH
    with pytest.raises(NvmlUnavailable):
        backend.read()


@pytest.mark.parametrize(
    "code", [fake_pynvml.NVML_ERROR_GPU_IS_LOST, fake_pynvml.NVML_ERROR_UNKNOWN]
)
@pytest.mark.parametrize(
    "call",
    [
        "nvmlDeviceGetHandleByIndex",
        "nvmlDeviceGetUUID",
        "nvmlDeviceGetMemoryInfo",
        "nvmlDeviceGetTemperature",
        "nvmlDeviceGetNvLinkState",
    ],
)
def test_a_lost_gpu_is_unavailable_with_unknown_fields(call: str, code: int) -> None:
    fake = make_fake(3)
    fake.gpus[1].faults[call] = code
    gpu0, gpu1, gpu2 = NvmlBackend(fake).read()
    assert gpu0.available and gpu2.available
    assert not gpu1.available and gpu1.index == 1
    unknown = ("memory_total_bytes", "memory_used_bytes", "memory_free_bytes", "util_pct",
               "memory_util_pct", "temperature_c", "power_w", "name", "mig_mode")  # fmt: skip
    assert all(getattr(gpu1, field) is None for field in unknown)
    assert gpu1.processes == () and gpu1.nvlink_peers == ()


def test_a_lost_gpu_keeps_the_uuid_it_had(caplog: pytest.LogCaptureFixture) -> None:
    fake = make_fake()
    backend = NvmlBackend(fake)
    uuid = backend.read()[1].uuid
    fake.gpus[1].lost = True
    lost = backend.read()[1]
    assert (lost.available, lost.uuid) == (False, uuid)
    backend.read()
    assert caplog.text.count("stopped answering") == 1  # logged on the change only
    fake.gpus[1].lost = False
    assert backend.read()[1].available


def test_a_gpu_lost_before_any_read_gets_a_placeholder_id() -> None:
    fake = make_fake()
    fake.gpus[0].lost = True
    gpu0, gpu1 = NvmlBackend(fake).read()
    assert not gpu0.available and not gpu0.uuid.startswith("GPU-")
    assert gpu1.available


@pytest.mark.parametrize(
    ("call", "fields"),
    [
        ("nvmlDeviceGetTemperature", ["temperature_c"]),
        ("nvmlDeviceGetPowerUsage", ["power_w"]),
        ("nvmlDeviceGetName", ["name"]),
        ("nvmlDeviceGetMigMode", ["mig_mode"]),
        ("nvmlDeviceGetUtilizationRates", ["util_pct", "memory_util_pct"]),
        (
            "nvmlDeviceGetMemoryInfo",
            ["memory_total_bytes", "memory_used_bytes", "memory_free_bytes"],
        ),
    ],
)
@pytest.mark.parametrize(
    "code", [fake_pynvml.NVML_ERROR_NOT_SUPPORTED, fake_pynvml.NVML_ERROR_NO_PERMISSION]
)
def test_an_unsupported_field_is_unknown_and_the_rest_is_read(
    call: str, fields: list[str], code: int
) -> None:
    fake = make_fake()
    fake.gpus[0].faults[call] = code
    gpu0, gpu1 = NvmlBackend(fake).read()
    assert gpu0.available
    for field in fields:
        assert getattr(gpu0, field) is None
        assert getattr(gpu1, field) is not None
    assert gpu0.uuid == "GPU-0000"


def test_unsupported_process_listing_is_empty() -> None:
    fake = make_fake(1, processes=[(123, GIB)])
    fake.gpus[0].faults["nvmlDeviceGetComputeRunningProcesses"] = (
        fake_pynvml.NVML_ERROR_NOT_SUPPORTED
    )
    assert NvmlBackend(fake).read()[0].processes == ()


def test_processes_fall_back_to_v2_on_a_driver_older_than_pynvml() -> None:
    fake = make_fake(1, processes=[(123, GIB)])
    fake.old_driver = True
    assert [p.pid for p in NvmlBackend(fake).read()[0].processes] == [123]


def test_values_and_units_are_converted() -> None:
    fake = make_fake(
        1,
        memory_total=80 * GIB,
        memory_used=30 * GIB,
        util_gpu=[42],
        util_memory=17,
        temperature_c=61,
        power_mw=123_456,
        processes=[(10, GIB), (11, None)],
        mig_mode=(1, 1),
    )
    (gpu,) = NvmlBackend(fake).read()
    assert (gpu.memory_total_bytes, gpu.memory_used_bytes) == (80 * GIB, 30 * GIB)
    assert gpu.memory_free_bytes == 50 * GIB
    assert (gpu.util_pct, gpu.memory_util_pct) == (42.0, 17.0)
    assert (gpu.temperature_c, gpu.power_w) == (61.0, 123.456)
    assert [(p.pid, p.used_memory_bytes) for p in gpu.processes] == [(10, GIB), (11, None)]
    assert gpu.mig_mode is True


@pytest.mark.parametrize(
    ("window", "samples", "expected"),
    [
        (5, [0, 100], [0.0, 50.0]),
        (1, [0, 100], [0.0, 100.0]),
        (2, [0, 100, 50, 50], [0.0, 50.0, 75.0, 50.0]),
        (5, [10, 20, 30], [10.0, 15.0, 20.0]),
    ],
)
def test_util_is_the_mean_over_the_window(
    window: int, samples: list[int], expected: list[float]
) -> None:
    backend = NvmlBackend(make_fake(1, util_gpu=samples), util_window=window)
    assert [backend.read()[0].util_pct for _ in samples] == expected


def test_an_unknown_util_sample_is_not_hidden_by_history() -> None:
    fake = make_fake(1, util_gpu=[80])
    backend = NvmlBackend(fake)
    backend.read()
    fake.gpus[0].faults["nvmlDeviceGetUtilizationRates"] = fake_pynvml.NVML_ERROR_NOT_SUPPORTED
    assert backend.read()[0].util_pct is None


def test_util_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="util_window"):
        NvmlBackend(make_fake(), util_window=0)


def test_nvlink_peers_are_mapped_by_pci_bus_id_in_any_format() -> None:
    fake = FakePynvml(
        [
            # Remote ids in the legacy 4-digit-domain, lower-case form; an inactive
            # link; a link to an NVSwitch (no local GPU at that bus id).
            FakeGpu(
                uuid="GPU-a",
                bus_id="00000000:1A:00.0",
                nvlinks=["0000:1b:00.0", None, "0000:99:00.0"],
            ),
            FakeGpu(
                uuid="GPU-b",
                bus_id="00000000:1B:00.0",
                nvlinks=["00000000:1A:00.0", "0000:1c:00.0"],
            ),
            FakeGpu(uuid="GPU-c", bus_id="00000000:1C:00.0", nvlinks=["00000000:1B:00.0"]),
            FakeGpu(uuid="GPU-d", bus_id="00000000:1D:00.0", nvlink_supported=False),
        ]
    )
    a, b, c, d = NvmlBackend(fake).read()
    assert (a.nvlink_peers, b.nvlink_peers) == (("GPU-b",), ("GPU-a", "GPU-c"))
    assert (c.nvlink_peers, d.nvlink_peers) == (("GPU-b",), ())


def test_a_gpu_without_nvlink_is_probed_once_not_per_link() -> None:
    fake = make_fake(2, nvlink_supported=False)
    NvmlBackend(fake).read()
    assert fake.calls.count("nvmlDeviceGetNvLinkState") == 2


def test_bytes_from_old_pynvml_are_decoded() -> None:
    fake = FakePynvml(
        [
            FakeGpu(
                uuid="GPU-x",
                bus_id="00000000:01:00.0",
                nvlinks=["00000000:02:00.0"],
                bytes_strings=True,
            ),
            FakeGpu(
                uuid="GPU-y",
                bus_id="00000000:02:00.0",
                nvlinks=["00000000:01:00.0"],
                bytes_strings=True,
            ),
        ]
    )
    x, y = NvmlBackend(fake).read()
    assert (x.uuid, x.name, x.nvlink_peers) == ("GPU-x", "NVIDIA A100-SXM4-40GB", ("GPU-y",))
    assert isinstance(x.uuid, str) and isinstance(x.name, str) and y.nvlink_peers == ("GPU-x",)


def test_default_module_is_the_real_pynvml() -> None:
    backend = NvmlBackend()
    try:
        backend.device_count()
    except NvmlUnavailable as exc:
        assert exc.code is not None  # the driver answered, e.g. LIBRARY_NOT_FOUND
    else:
        pytest.skip("NVML works here; tests/gpu covers the real library")
    finally:
        backend.close()


# -- simulated backend --------------------------------------------------------------------


def make_node(*gpus: SimGpuSpec, name: str = "n") -> SimNodeSpec:
    return SimNodeSpec(name=name, cpus=2, memory_gb=8, gpus=list(gpus))


def _reaped_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_sim_reports_declared_gpus_in_order_with_stable_uuids() -> None:
    node = make_node(
        SimGpuSpec(type="T4", memory_gb=16, count=2), SimGpuSpec(type="A100", memory_gb=80)
    )
    readings = SimulatedBackend(node).read()
    assert [r.name for r in readings] == ["T4", "T4", "A100"]
    assert [r.memory_total_bytes for r in readings] == [16 * GIB, 16 * GIB, 80 * GIB]
    assert [r.uuid for r in SimulatedBackend(node).read()] == [r.uuid for r in readings]
    assert all(r.uuid.startswith("GPU-sim-") for r in readings)
    other = SimulatedBackend(node, node_seed="cluster-2").read()
    assert not {r.uuid for r in other} & {r.uuid for r in readings}
    renamed = SimulatedBackend(make_node(*node.gpus, name="m")).read()
    assert not {r.uuid for r in renamed} & {r.uuid for r in readings}


def test_sim_external_memory_and_background_util() -> None:
    node = make_node(
        SimGpuSpec(type="A100", memory_gb=40, external_memory_gb=8, background_util_pct=20)
    )
    (gpu,) = SimulatedBackend(node).read()
    assert (gpu.memory_used_bytes, gpu.memory_free_bytes) == (8 * GIB, 32 * GIB)
    assert gpu.util_pct == 20.0 and gpu.processes == ()


def test_sim_usage_of_a_live_process_counts_until_removed(tmp_path: Path) -> None:
    backend = SimulatedBackend(make_node(SimGpuSpec(type="T4", memory_gb=16, count=2)), tmp_path)
    write_usage(tmp_path, "job-1", os.getpid(), [0, 1], 3 * GIB)
    for gpu in backend.read():
        assert gpu.memory_used_bytes == 3 * GIB
        assert [(p.pid, p.used_memory_bytes) for p in gpu.processes] == [(os.getpid(), 3 * GIB)]
        assert gpu.util_pct == JOB_UTIL_INCREMENT_PCT
    assert remove_usage(tmp_path, "job-1") == 1
    assert all(g.memory_used_bytes == 0 and g.processes == () for g in backend.read())


def test_sim_usage_of_a_dead_process_is_ignored(tmp_path: Path) -> None:
    backend = SimulatedBackend(make_node(SimGpuSpec(type="T4", memory_gb=16)), tmp_path)
    write_usage(tmp_path, "job-dead", _reaped_pid(), [0], 3 * GIB)
    (gpu,) = backend.read()
    assert (gpu.memory_used_bytes, gpu.processes, gpu.util_pct) == (0, (), 0.0)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_sim_usage_of_a_zombie_or_recycled_pid_is_ignored(tmp_path: Path) -> None:
    backend = SimulatedBackend(make_node(SimGpuSpec(type="T4", memory_gb=16)), tmp_path)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child.pid}/stat").read_text().split(")")[-1].split()[0] != "Z":
            assert time.monotonic() < deadline, "child did not exit"
            time.sleep(0.02)
        write_usage(tmp_path, "job-zombie", child.pid, [0], GIB)
        assert backend.read()[0].processes == ()
    finally:
        child.wait()
    # Our own pid, but recorded with another process's start time: a recycled pid.
    path = write_usage(tmp_path, "job-old", os.getpid(), [0], GIB)
    record = json.loads(path.read_text())
    record["pid_start_ticks"] = (record["pid_start_ticks"] or 0) + 1
    path.write_text(json.dumps(record))
    assert backend.read()[0].processes == ()


def test_sim_counts_jobs_not_processes_for_util_and_caps_at_100(tmp_path: Path) -> None:
    node = make_node(SimGpuSpec(type="T4", memory_gb=16, background_util_pct=5, count=2))
    backend = SimulatedBackend(node, tmp_path)
    write_usage(tmp_path, "ddp", os.getpid(), [0], GIB)
    write_usage(tmp_path, "ddp", os.getppid(), [0], GIB)  # a second process of the same job
    assert backend.read()[0].util_pct == 5 + JOB_UTIL_INCREMENT_PCT
    for job in ("a", "b", "c", "d"):
        write_usage(tmp_path, job, os.getpid(), [1], GIB)
    gpu1 = backend.read()[1]
    assert gpu1.util_pct == 100.0
    assert gpu1.processes[0].used_memory_bytes == 4 * GIB  # one pid, four jobs: summed
    assert remove_usage(tmp_path, "ddp") == 2


def test_sim_overcommit_shows_a_full_gpu_not_negative_free(tmp_path: Path) -> None:
    backend = SimulatedBackend(
        make_node(SimGpuSpec(type="T4", memory_gb=16, external_memory_gb=12)), tmp_path
    )
    write_usage(tmp_path, "big", os.getpid(), [0], 8 * GIB)
    (gpu,) = backend.read()
    assert (gpu.memory_used_bytes, gpu.memory_free_bytes) == (16 * GIB, 0)


def test_sim_skips_bad_usage_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    backend = SimulatedBackend(make_node(SimGpuSpec(type="T4", memory_gb=16)), tmp_path)
    (tmp_path / "broken@1.json").write_text("{not json")
    (tmp_path / "typo@1.json").write_text(json.dumps({"job_id": "x", "pid": 1, "gpus": [0]}))
    (tmp_path / ".half.json.123.tmp").write_text("{")
    write_usage(tmp_path, "far", os.getpid(), [7], GIB)  # no GPU 7 on this node
    (gpu,) = backend.read()
    assert gpu.memory_used_bytes == 0
    assert "broken@1.json" in caplog.text and "typo@1.json" in caplog.text
    caplog.clear()
    backend.read()
    assert caplog.text == ""  # each problem is logged once, not on every sample


@pytest.mark.parametrize("job_id", ["", "a/b", "a@b", "../x", ".hidden"])
def test_usage_refuses_job_ids_that_cannot_name_a_file(tmp_path: Path, job_id: str) -> None:
    with pytest.raises(ValueError, match="job id"):
        write_usage(tmp_path, job_id, os.getpid(), [0], GIB)


def test_sim_without_usage_dir_or_with_a_missing_one(tmp_path: Path) -> None:
    node = make_node(SimGpuSpec(type="T4", memory_gb=16))
    assert SimulatedBackend(node).read()[0].memory_used_bytes == 0
    assert SimulatedBackend(node, tmp_path / "absent").read()[0].memory_used_bytes == 0
    assert remove_usage(tmp_path / "absent", "job") == 0


@settings(max_examples=40, deadline=None)
@given(
    gpus=st.lists(
        st.tuples(st.floats(1, 96), st.floats(0, 1), st.floats(0, 100)), min_size=1, max_size=4
    ),
    jobs=st.lists(
        st.tuples(st.lists(st.integers(0, 5), max_size=3), st.integers(0, 64 * GIB)), max_size=5
    ),
)
def test_sim_readings_keep_the_contract_whatever_jobs_declare(
    gpus: list[tuple[float, float, float]], jobs: list[tuple[list[int], int]]
) -> None:
    node = make_node(
        *(
            SimGpuSpec(type="X", memory_gb=m, external_memory_gb=m * e, background_util_pct=u)
            for m, e, u in gpus
        )
    )
    with tempfile.TemporaryDirectory() as usage_dir:
        for i, (indices, used) in enumerate(jobs):
            write_usage(usage_dir, f"j{i}", os.getpid(), indices, used)
        assert_reading_contract(SimulatedBackend(node, Path(usage_dir)).read(), len(gpus))


# -- backend selection -------------------------------------------------------------------


def test_auto_falls_back_to_simulated_without_nvml(tmp_path: Path) -> None:
    node = make_node(SimGpuSpec(type="T4", memory_gb=16))
    broken = FakePynvml(init_error=fake_pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    backend = select_backend("auto", node, tmp_path, nvml_module=broken)
    assert isinstance(backend, SimulatedBackend) and len(backend.read()) == 1
    assert isinstance(
        select_backend("auto", node, tmp_path, nvml_module=make_fake(0)), SimulatedBackend
    )


def test_auto_on_this_machine_falls_back_to_simulated(tmp_path: Path) -> None:
    probe = NvmlBackend()
    try:
        if probe.device_count() > 0:
            pytest.skip("this machine has a GPU")
    except NvmlUnavailable:
        pass
    finally:
        probe.close()
    backend = select_backend("auto", None, tmp_path)
    assert backend.name == "simulated" and backend.read() == ()


def test_auto_and_nvml_use_nvml_when_it_works(tmp_path: Path) -> None:
    for mode in ("auto", "nvml"):
        backend = select_backend(mode, None, tmp_path, nvml_module=make_fake(2))
        assert isinstance(backend, NvmlBackend) and len(backend.read()) == 2


def test_nvml_mode_without_nvml_says_why(tmp_path: Path) -> None:
    broken = FakePynvml(init_error=fake_pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    with pytest.raises(NvmlUnavailable, match=r"'nvml' was requested.*nvmlInit"):
        select_backend("nvml", None, tmp_path, nvml_module=broken)


def test_simulated_mode_and_bad_modes(tmp_path: Path) -> None:
    assert select_backend("simulated", None, tmp_path, nvml_module=make_fake(2)).read() == ()
    with pytest.raises(ValueError, match="'auto', 'nvml' or 'simulated'"):
        select_backend("gpu", None, tmp_path)


# -- cluster configs ---------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(CLUSTER_CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_cluster_config_loads_and_reads(path: Path, tmp_path: Path) -> None:
    cluster = load_cluster_config(path)
    for node in cluster.nodes:
        backend = simulated_backend_for(cluster, node.name, tmp_path)
        assert_reading_contract(backend.read(), len(node.expand_gpus()))


def test_local_sim_config_is_what_the_demo_expects() -> None:
    (gpu0, gpu1) = simulated_backend_for(
        load_cluster_config(CLUSTER_CONFIGS / "local_sim.yaml"), "local", None
    ).read()
    assert (gpu0.name, gpu0.memory_free_bytes, gpu0.util_pct) == ("A100", 40 * GIB, 0.0)
    assert (gpu1.memory_free_bytes, gpu1.util_pct) == (32 * GIB, 20.0)


def test_two_nodes_sim_config_is_what_placement_tests_expect() -> None:
    cluster = load_cluster_config(CLUSTER_CONFIGS / "two_nodes_sim.yaml")
    a0, a1 = simulated_backend_for(cluster, "node-a", None).read()
    assert a0.memory_total_bytes == 80 * GIB and a0.nvlink_peers == (a1.uuid,)
    node_b = simulated_backend_for(cluster, "node-b", None).read()
    assert [g.name for g in node_b] == ["T4"] * 4
    assert sorted(g.memory_free_bytes or 0 for g in node_b) == [4 * GIB] + [16 * GIB] * 3
    assert max(g.util_pct or 0 for g in node_b) == 95.0


_VALID_NODE = "  - name: a\n    cpus: 1\n    memory_gb: 1\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "nodes:\n" + _VALID_NODE + "  - name: b\n    cpus: 1\n    memory_gb: 2\n    gpus:\n"
            "      - type: T4\n        memory_gb: 0\n",
            "x.yaml:10: nodes.1.gpus.0.memory_gb: Input should be greater than 0",
        ),
        (
            "nodes:\n" + _VALID_NODE + "    colour: red\n",
            "x.yaml:5: nodes.0.colour: Extra inputs are not permitted",
        ),
        ("nodes:\n  - name: a\n    memory_gb: 1\n", "x.yaml:2: nodes.0.cpus: Field required"),
        (
            "nodes:\n  - name: a\n    cpus: 0\n    memory_gb: 1\n",
            "x.yaml:3: nodes.0.cpus: Input should be greater than or equal to 1",
        ),
        (
            "nodes:\n"
            + _VALID_NODE
            + "    gpus: [{type: T4, memory_gb: 16, external_memory_gb: 20}]\n",
            "nodes.0.gpus.0.external_memory_gb: must not exceed memory_gb (16)",
        ),
        (
            "nodes:\n"
            + _VALID_NODE
            + "    gpus: [{type: T4, memory_gb: 16, background_util_pct: 101}]\n",
            "nodes.0.gpus.0.background_util_pct: Input should be less than or equal to 100",
        ),
        (
            "nodes:\n" + _VALID_NODE + _VALID_NODE,
            "x.yaml:1: nodes: duplicate node name 'a' (nodes 0 and 1)",
        ),
        ("nodes: []\n", "nodes: List should have at least 1 item"),
        ("", "x.yaml: (top level): Input should be a valid dictionary"),
        ("nodes:\n  - name: a\n   cpus: [1\n", "x.yaml:3:4: YAML syntax error"),
    ],
    ids=[
        "memory",
        "unknown-key",
        "missing",
        "cpus",
        "external",
        "util",
        "duplicate",
        "empty-list",
        "empty-file",
        "syntax",
    ],
)
def test_config_errors_name_the_line_and_field(text: str, expected: str) -> None:
    with pytest.raises(ClusterConfigError) as info:
        parse_cluster_config(text, "x.yaml")
    assert expected in str(info.value)
    assert isinstance(info.value, ValueError)


def test_load_cluster_config_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes:\n  - name: a\n    cpus: 1\n    memory_gb: -1\n")
    with pytest.raises(ClusterConfigError, match=r"bad\.yaml:4: nodes\.0\.memory_gb"):
        load_cluster_config(bad)
    with pytest.raises(ClusterConfigError, match="cannot read"):
        load_cluster_config(tmp_path / "absent.yaml")


def test_unknown_node_names_the_known_ones() -> None:
    cluster = SimClusterSpec(nodes=[make_node(name="a"), make_node(name="b")])
    with pytest.raises(ClusterConfigError, match=r"'c'.*nodes: a, b"):
        simulated_backend_for(cluster, "c", None)


def test_gb_means_gib() -> None:
    assert BYTES_PER_GB == GIB
