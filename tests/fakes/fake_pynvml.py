"""A fake ``pynvml`` module: the functions the NVML adapter calls, on configurable devices.

It mirrors nvidia-ml-py where the adapter depends on it: function names and
signatures, ``NVMLError`` with ``.value``, the numeric ``NVML_*`` constants
(copied from nvidia-ml-py 12.x), result structures with the same attribute
names, reference-counted ``nvmlInit``/``nvmlShutdown``, and
``NVMLError(NVML_ERROR_UNINITIALIZED)`` from any call made before ``nvmlInit``.

Example::

    fake = FakePynvml([FakeGpu(uuid="GPU-a", memory_used=2 * GIB, util_gpu=[0, 100])])
    backend = NvmlBackend(fake)
    fake.gpus[0].lost = True            # the next read sees GPU_IS_LOST
    fake.gpus[0].faults["nvmlDeviceGetTemperature"] = NVML_ERROR_NOT_SUPPORTED
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType, SimpleNamespace

GIB = 1 << 30

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_ALREADY_INITIALIZED = 5
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_INSUFFICIENT_SIZE = 7
NVML_ERROR_INSUFFICIENT_POWER = 8
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_IRQ_ISSUE = 11
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_CORRUPTED_INFOROM = 14
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_RESET_REQUIRED = 16
NVML_ERROR_OPERATING_SYSTEM = 17
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
NVML_ERROR_IN_USE = 19
NVML_ERROR_MEMORY = 20
NVML_ERROR_NO_DATA = 21
NVML_ERROR_UNKNOWN = 999

NVML_TEMPERATURE_GPU = 0
NVML_FEATURE_DISABLED = 0
NVML_FEATURE_ENABLED = 1
NVML_DEVICE_MIG_DISABLE = 0
NVML_DEVICE_MIG_ENABLE = 1
NVML_NVLINK_MAX_LINKS = 36

_ERROR_STRINGS = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_LIB_RM_VERSION_MISMATCH: "RM has detected an NVML/RM version mismatch.",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}


class NVMLError(Exception):
    """As ``pynvml.NVMLError``: the NVML return code is in ``.value``."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _ERROR_STRINGS.get(self.value, f"NVML Error with code {self.value}")


class NVMLLibraryMismatchError(Exception):
    """As pynvml's: an unversioned call whose newest version this driver lacks."""


@dataclass
class FakeGpu:
    """One simulated device as the driver would describe it. Mutable between reads.

    ``util_gpu`` is consumed one value per ``nvmlDeviceGetUtilizationRates``
    call and then repeats its last value. ``nvlinks[i]`` is the PCI bus id at
    the far end of link ``i`` (``None``: link inactive); links past the list
    answer ``INVALID_ARGUMENT``, and with ``nvlink_supported=False`` every link
    answers ``NOT_SUPPORTED``. ``faults`` maps a function name to the NVML
    error code it raises for this device; ``lost=True`` makes every call on
    it, handle lookup included, raise ``GPU_IS_LOST``. ``mig_mode=None`` means
    MIG is not supported. ``bytes_strings`` returns name/UUID/bus ids as bytes,
    as old pynvml releases did.
    """

    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    name: str = "NVIDIA A100-SXM4-40GB"
    bus_id: str = "00000000:01:00.0"
    memory_total: int = 40 * GIB
    memory_used: int = 0
    util_gpu: Sequence[int] = (0,)
    util_memory: int = 0
    temperature_c: int = 35
    power_mw: int = 60_000
    processes: list[tuple[int, int | None]] = field(default_factory=list)
    mig_mode: tuple[int, int] | None = (NVML_DEVICE_MIG_DISABLE, NVML_DEVICE_MIG_DISABLE)
    nvlinks: list[str | None] = field(default_factory=list)
    nvlink_supported: bool = True
    lost: bool = False
    faults: dict[str, int] = field(default_factory=dict)
    bytes_strings: bool = False
    _util_calls: int = 0


@dataclass(frozen=True)
class _Handle:
    """Opaque device handle, like pynvml's ``c_nvmlDevice_t`` pointer."""

    index: int


class FakePynvml(ModuleType):
    """A module object standing in for ``pynvml``; pass it to ``NvmlBackend(nvml=...)``.

    ``init_error`` makes ``nvmlInit`` raise that code (e.g.
    ``NVML_ERROR_LIBRARY_NOT_FOUND`` for a machine without a driver).
    ``old_driver=True`` makes the unversioned process listing raise
    ``NVMLLibraryMismatchError`` while ``..._v2`` works, as pynvml does on a
    driver older than itself.
    ``calls`` records every function called, in order, for assertions.
    """

    # Constants and the error class are reachable as attributes, as on the module.
    NVMLError = NVMLError
    NVMLLibraryMismatchError = NVMLLibraryMismatchError
    NVML_SUCCESS = NVML_SUCCESS
    NVML_ERROR_UNINITIALIZED = NVML_ERROR_UNINITIALIZED
    NVML_ERROR_INVALID_ARGUMENT = NVML_ERROR_INVALID_ARGUMENT
    NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_NO_PERMISSION = NVML_ERROR_NO_PERMISSION
    NVML_ERROR_DRIVER_NOT_LOADED = NVML_ERROR_DRIVER_NOT_LOADED
    NVML_ERROR_LIBRARY_NOT_FOUND = NVML_ERROR_LIBRARY_NOT_FOUND
    NVML_ERROR_FUNCTION_NOT_FOUND = NVML_ERROR_FUNCTION_NOT_FOUND
    NVML_ERROR_GPU_IS_LOST = NVML_ERROR_GPU_IS_LOST
    NVML_ERROR_RESET_REQUIRED = NVML_ERROR_RESET_REQUIRED
    NVML_ERROR_LIB_RM_VERSION_MISMATCH = NVML_ERROR_LIB_RM_VERSION_MISMATCH
    NVML_ERROR_UNKNOWN = NVML_ERROR_UNKNOWN
    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU
    NVML_FEATURE_DISABLED = NVML_FEATURE_DISABLED
    NVML_FEATURE_ENABLED = NVML_FEATURE_ENABLED
    NVML_DEVICE_MIG_DISABLE = NVML_DEVICE_MIG_DISABLE
    NVML_DEVICE_MIG_ENABLE = NVML_DEVICE_MIG_ENABLE
    NVML_NVLINK_MAX_LINKS = NVML_NVLINK_MAX_LINKS

    def __init__(
        self, gpus: Sequence[FakeGpu] = (), init_error: int | None = None, old_driver: bool = False
    ) -> None:
        super().__init__("pynvml")
        self.gpus: list[FakeGpu] = list(gpus)
        self.init_error = init_error
        self.old_driver = old_driver
        self.refcount = 0
        self.calls: list[str] = []

    # -- plumbing ---------------------------------------------------------------------

    def _enter(self, fn: str) -> None:
        self.calls.append(fn)
        if self.refcount == 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)

    def _gpu(self, fn: str, handle: _Handle) -> FakeGpu:
        """The device behind a handle, after the faults configured for ``fn``."""
        self._enter(fn)
        if not isinstance(handle, _Handle) or not 0 <= handle.index < len(self.gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        gpu = self.gpus[handle.index]
        if gpu.lost:
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)
        if fn in gpu.faults:
            raise NVMLError(gpu.faults[fn])
        return gpu

    @staticmethod
    def _text(gpu: FakeGpu, value: str) -> str | bytes:
        return value.encode() if gpu.bytes_strings else value

    # -- library ----------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self.calls.append("nvmlInit")
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self.refcount += 1

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        self.refcount -= 1

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        gpu = self.gpus[index]
        if gpu.lost:
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)
        if "nvmlDeviceGetHandleByIndex" in gpu.faults:
            raise NVMLError(gpu.faults["nvmlDeviceGetHandleByIndex"])
        return _Handle(index)

    # -- device queries ---------------------------------------------------------------

    def nvmlDeviceGetUUID(self, handle: _Handle) -> str | bytes:
        gpu = self._gpu("nvmlDeviceGetUUID", handle)
        return self._text(gpu, gpu.uuid)

    def nvmlDeviceGetName(self, handle: _Handle) -> str | bytes:
        gpu = self._gpu("nvmlDeviceGetName", handle)
        return self._text(gpu, gpu.name)

    def nvmlDeviceGetPciInfo(self, handle: _Handle) -> SimpleNamespace:
        gpu = self._gpu("nvmlDeviceGetPciInfo", handle)
        return SimpleNamespace(busId=self._text(gpu, gpu.bus_id))

    def nvmlDeviceGetMemoryInfo(
        self, handle: _Handle, version: int | None = None
    ) -> SimpleNamespace:
        gpu = self._gpu("nvmlDeviceGetMemoryInfo", handle)
        used = min(gpu.memory_used, gpu.memory_total)
        return SimpleNamespace(total=gpu.memory_total, used=used, free=gpu.memory_total - used)

    def nvmlDeviceGetUtilizationRates(self, handle: _Handle) -> SimpleNamespace:
        gpu = self._gpu("nvmlDeviceGetUtilizationRates", handle)
        values = list(gpu.util_gpu) or [0]
        value = values[min(gpu._util_calls, len(values) - 1)]
        gpu._util_calls += 1
        return SimpleNamespace(gpu=value, memory=gpu.util_memory)

    def nvmlDeviceGetTemperature(self, handle: _Handle, sensor: int) -> int:
        gpu = self._gpu("nvmlDeviceGetTemperature", handle)
        if sensor != NVML_TEMPERATURE_GPU:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return gpu.temperature_c

    def nvmlDeviceGetPowerUsage(self, handle: _Handle) -> int:
        return self._gpu("nvmlDeviceGetPowerUsage", handle).power_mw

    def nvmlDeviceGetComputeRunningProcesses(self, handle: _Handle) -> list[SimpleNamespace]:
        if self.old_driver:
            self._enter("nvmlDeviceGetComputeRunningProcesses")
            raise NVMLLibraryMismatchError("use nvmlDeviceGetComputeRunningProcesses_v2")
        return self.nvmlDeviceGetComputeRunningProcesses_v2(handle)

    def nvmlDeviceGetComputeRunningProcesses_v2(self, handle: _Handle) -> list[SimpleNamespace]:
        gpu = self._gpu("nvmlDeviceGetComputeRunningProcesses", handle)
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in gpu.processes]

    def nvmlDeviceGetMigMode(self, device: _Handle) -> list[int]:
        gpu = self._gpu("nvmlDeviceGetMigMode", device)
        if gpu.mig_mode is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return list(gpu.mig_mode)

    def _link(self, fn: str, device: _Handle, link: int) -> tuple[FakeGpu, str | None]:
        gpu = self._gpu(fn, device)
        if not gpu.nvlink_supported:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        if not 0 <= link < len(gpu.nvlinks):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return gpu, gpu.nvlinks[link]

    def nvmlDeviceGetNvLinkState(self, device: _Handle, link: int) -> int:
        _, remote = self._link("nvmlDeviceGetNvLinkState", device, link)
        return NVML_FEATURE_DISABLED if remote is None else NVML_FEATURE_ENABLED

    def nvmlDeviceGetNvLinkRemotePciInfo(self, device: _Handle, link: int) -> SimpleNamespace:
        gpu, remote = self._link("nvmlDeviceGetNvLinkRemotePciInfo", device, link)
        if remote is None:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return SimpleNamespace(busId=self._text(gpu, remote))
