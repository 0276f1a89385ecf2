"""GPU telemetry backends: one contract suite run over both the NVML adapter and the simulator.

The NVML adapter runs on the fake ``pynvml`` module (tests/fakes/fake_pynvml.py);
``tests/gpu/test_nvml_real.py`` runs the same contract checks
(:func:`tests.unit.gpu_backend_helpers.assert_reading_contract`) on real NVML.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fakes.fake_pynvml import GIB, FakeGpu, FakePynvml
from tests.unit.gpu_backend_helpers import assert_reading_contract
from workers.interface.telemetry import GpuBackend
from workers.nvml_backend import NvmlBackend
from workers.sim_backend import SimGpuSpec, SimNodeSpec, SimulatedBackend, write_usage


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
