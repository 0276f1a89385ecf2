"""The NVML adapter on the fake ``pynvml`` module (tests/fakes/fake_pynvml.py).

Start-up and shut-down, lost GPUs and unsupported fields, units, the util window,
NVLink peers. ``tests/gpu/test_nvml_real.py`` covers the real library.
"""

from __future__ import annotations

import inspect

import pytest

from tests.fakes import fake_pynvml
from tests.fakes.fake_pynvml import GIB, FakeGpu, FakePynvml
from tests.unit.gpu_backend_helpers import make_fake
from workers.interface.errors import NvmlUnavailable
from workers.nvml_backend import NvmlBackend


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
