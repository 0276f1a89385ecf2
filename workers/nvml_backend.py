"""The NVML adapter: GPU readings from the NVIDIA driver through ``pynvml`` (nvidia-ml-py).

This is the only module that imports ``pynvml``. Every driver call goes
through :meth:`NvmlBackend._query`, which starts NVML lazily, decodes bytes
and turns ``NVMLError`` into our own errors or an unknown value (``None``),
as nvitop's ``nvmlQuery`` does. The rest of jobworker never sees ``NVMLError``.

Example::

    backend = NvmlBackend()
    for gpu in backend.read():
        print(gpu.index, gpu.uuid, gpu.memory_free_bytes)
    backend.close()
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from workers.interface.errors import GpuLost, NvmlUnavailable
from workers.interface.telemetry import GpuProcess, GpuReading, GpuUuid

logger = logging.getLogger(__name__)

# NVML return codes (nvml.h; the values are part of the driver ABI and equal
# pynvml's NVML_ERROR_* constants). Kept here so the classification below does
# not depend on which names a given pynvml release exports.
_ERROR_UNINITIALIZED = 1
_ERROR_DRIVER_NOT_LOADED = 9
_ERROR_LIBRARY_NOT_FOUND = 12
_ERROR_FUNCTION_NOT_FOUND = 13
_ERROR_GPU_IS_LOST = 15
_ERROR_RESET_REQUIRED = 16
_ERROR_LIB_RM_VERSION_MISMATCH = 18
_ERROR_UNKNOWN = 999

# The library itself is unusable: every further call would fail the same way
# (e.g. the driver was upgraded under a running process).
_LIBRARY_FATAL = frozenset(
    {_ERROR_DRIVER_NOT_LOADED, _ERROR_LIBRARY_NOT_FOUND, _ERROR_LIB_RM_VERSION_MISMATCH}
)
# This device cannot be trusted for any value until it is reset.
_DEVICE_FATAL = frozenset({_ERROR_GPU_IS_LOST, _ERROR_RESET_REQUIRED, _ERROR_UNKNOWN})

# Unversioned pynvml calls use the newest struct; a driver older than pynvml
# lacks it (nvitop falls back the same way).
_OLDER_VERSION = {
    "nvmlDeviceGetComputeRunningProcesses": "nvmlDeviceGetComputeRunningProcesses_v2",
}

_NVLINK_ACTIVE = 1  # NVML_FEATURE_ENABLED
_MIG_ENABLED = 1  # NVML_DEVICE_MIG_ENABLE


def _decode(value: Any) -> Any:
    """Older pynvml releases return ``bytes`` for strings; newer ones ``str``."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


def _bus_key(bus_id: Any) -> str | None:
    """Canonical PCI bus id, so ``"00000000:3B:00.0"`` equals ``"0000:3b:00.0"``.

    NVML reports the local id with an 8-digit domain and the NVLink remote id
    sometimes in the legacy 4-digit form; comparing raw strings would miss peers.
    """
    text = _decode(bus_id)
    if not isinstance(text, str) or not text.strip("\x00 "):
        return None
    text = text.strip("\x00 ").lower()
    try:
        domain, bus, rest = text.split(":")
        device, function = rest.split(".")
        return (
            f"{int(domain, 16):08x}:{int(bus, 16):02x}:{int(device, 16):02x}.{int(function, 16):x}"
        )
    except ValueError:
        return text


@dataclass
class _Device:
    """A device opened for one read: its handle and identity."""

    index: int
    handle: Any
    uuid: GpuUuid
    bus_key: str | None


class NvmlBackend:
    """GPU readings from NVML. Implements :class:`workers.interface.telemetry.GpuBackend`.

    ``nvml`` is the ``pynvml`` module, or a fake with the same functions in
    tests; by default the real one is imported (``NvmlUnavailable`` if absent).
    ``util_window`` is how many samples ``util_pct`` is averaged over, per GPU.

    NVML is initialised on the first driver call, not in the constructor, and
    again after :meth:`close`. ``read()`` raises :class:`NvmlUnavailable` only
    when NVML cannot start or stops working as a library; a failing device is
    reported as ``available=False`` with unknown (``None``) fields.

    Example::

        backend = NvmlBackend(util_window=5)
        readings = backend.read()   # nvidia-smi --query-gpu=index,uuid,memory.used,...
        backend.close()             # nvmlShutdown; a later read() starts NVML again
    """

    name: str = "nvml"

    def __init__(self, nvml: ModuleType | None = None, util_window: int = 5) -> None:
        if util_window < 1:
            raise ValueError(f"util_window must be >= 1, got {util_window}")
        if nvml is None:
            try:
                import pynvml
            except ImportError as exc:  # nvidia-ml-py not installed
                raise NvmlUnavailable(f"pynvml (nvidia-ml-py) cannot be imported: {exc}") from exc
            nvml = pynvml
        self._nvml: ModuleType = nvml
        mismatch = getattr(nvml, "NVMLLibraryMismatchError", None)
        # Raised instead of NVMLError when pynvml is newer than the driver; not every
        # pynvml (nor the fake) has it, and an empty tuple catches nothing.
        self._mismatch_errors: tuple[type[BaseException], ...] = (mismatch,) if mismatch else ()
        self._util_window = util_window
        self._util_history: dict[GpuUuid, deque[float]] = {}
        # The last UUID seen at each index, so a GPU lost later keeps its identity.
        self._known_uuids: dict[int, GpuUuid] = {}
        self._lost: set[int] = set()  # indices reported unavailable by the last read
        self._initialized = False
        # The node agent may close() from another thread while a read is running.
        self._lock = threading.RLock()

    # -- lifecycle -----------------------------------------------------------------

    def _init(self) -> None:
        """Start NVML (``nvmlInit``); raise :class:`NvmlUnavailable` if it cannot start."""
        try:
            self._nvml.nvmlInit()
        except self._nvml.NVMLError as exc:
            code = getattr(exc, "value", None)
            raise NvmlUnavailable(
                f"NVML cannot start (nvmlInit failed with error {code}: {exc}); "
                "is an NVIDIA driver installed and a GPU visible?",
                code,
            ) from exc
        except OSError as exc:  # some pynvml builds surface dlopen failures this way
            raise NvmlUnavailable(f"NVML cannot start: {exc}") from exc
        self._initialized = True

    def close(self) -> None:
        """Release NVML (``nvmlShutdown``). Safe to call twice; ``read()`` re-initialises."""
        with self._lock:
            if not self._initialized:
                return
            self._initialized = False
            self._util_history.clear()
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as exc:
                # Nothing useful to do: the handle is gone either way.
                logger.debug("nvmlShutdown failed: %s", exc)

    # -- the one gate to the driver ----------------------------------------------------

    def _query(self, fn_name: str, *args: Any, retried: bool = False) -> Any:
        """Call ``pynvml.<fn_name>(*args)``: the only place a driver function is called.

        Starts NVML lazily. Returns the result with bytes decoded to ``str``, or
        ``None`` when the value is unknown (``NOT_SUPPORTED``, ``NO_PERMISSION``,
        a function this driver lacks, ...). Raises :class:`GpuLost` when the
        device is gone (``GPU_IS_LOST``, ``RESET_REQUIRED``, ``UNKNOWN``) and
        :class:`NvmlUnavailable` when the library itself fails.
        """
        with self._lock:
            if not self._initialized:
                self._init()
            fn = getattr(self._nvml, fn_name, None)
            if fn is None:
                logger.debug("%s is not in this pynvml; value unknown", fn_name)
                return None
            try:
                return _decode(fn(*args))
            except self._mismatch_errors as exc:  # pynvml's NVMLLibraryMismatchError
                failure: BaseException = exc
                code: int | None = _ERROR_FUNCTION_NOT_FOUND
            except self._nvml.NVMLError as exc:
                failure, code = exc, getattr(exc, "value", None)
            if code == _ERROR_UNINITIALIZED and not retried:
                # Another user of pynvml in this process shut NVML down (it is
                # reference-counted): start it again and retry once.
                self._initialized = False
                return self._query(fn_name, *args, retried=True)
            if code == _ERROR_FUNCTION_NOT_FOUND and fn_name in _OLDER_VERSION:
                # pynvml is newer than the driver: fall back to the older versioned call.
                return self._query(_OLDER_VERSION[fn_name], *args)
            if code in _LIBRARY_FATAL or code == _ERROR_UNINITIALIZED:
                self._initialized = False
                raise NvmlUnavailable(
                    f"NVML stopped working ({fn_name} failed with error {code}: {failure})", code
                ) from failure
            if code in _DEVICE_FATAL:
                raise GpuLost(fn_name, code) from failure
            logger.debug("%s failed with NVML error %s (%s); value unknown", fn_name, code, failure)
            return None

    # -- adapters: one driver call each ----------------------------------------------

    def device_count(self) -> int:
        """Number of GPUs NVML sees: ``nvmlDeviceGetCount`` (``nvidia-smi --list-gpus``).

        Starts NVML, so it doubles as a probe; raises :class:`NvmlUnavailable`
        when NVML cannot start or cannot enumerate devices.
        """
        count = self._query("nvmlDeviceGetCount")
        if not isinstance(count, int):
            raise NvmlUnavailable("NVML started but could not count devices (nvmlDeviceGetCount)")
        return count

    def _handle(self, index: int) -> Any:
        """``nvmlDeviceGetHandleByIndex``; ``None`` if the driver will not give one."""
        return self._query("nvmlDeviceGetHandleByIndex", index)

    def _uuid(self, handle: Any) -> GpuUuid | None:
        """``nvmlDeviceGetUUID`` (``nvidia-smi --query-gpu=uuid``)."""
        uuid = self._query("nvmlDeviceGetUUID", handle)
        return GpuUuid(uuid) if isinstance(uuid, str) and uuid else None

    def _pci_bus_key(self, handle: Any) -> str | None:
        """``nvmlDeviceGetPciInfo(h).busId`` (``nvidia-smi --query-gpu=pci.bus_id``)."""
        info = self._query("nvmlDeviceGetPciInfo", handle)
        return None if info is None else _bus_key(getattr(info, "busId", None))

    def _name(self, handle: Any) -> str | None:
        """``nvmlDeviceGetName`` (``nvidia-smi --query-gpu=name``)."""
        name = self._query("nvmlDeviceGetName", handle)
        return name if isinstance(name, str) else None

    def _memory(self, handle: Any) -> tuple[int | None, int | None, int | None]:
        """(total, used, free) bytes: ``nvmlDeviceGetMemoryInfo``
        (``nvidia-smi --query-gpu=memory.total,memory.used,memory.free``)."""
        info = self._query("nvmlDeviceGetMemoryInfo", handle)
        if info is None:
            return None, None, None
        return int(info.total), int(info.used), int(info.free)

    def _utilization(self, handle: Any) -> tuple[float | None, float | None]:
        """(gpu, memory) percent over the driver's last sample period:
        ``nvmlDeviceGetUtilizationRates`` (``utilization.gpu``, ``utilization.memory``)."""
        rates = self._query("nvmlDeviceGetUtilizationRates", handle)
        if rates is None:
            return None, None
        return float(rates.gpu), float(rates.memory)

    def _temperature(self, handle: Any) -> float | None:
        """Core temperature in °C: ``nvmlDeviceGetTemperature(h, NVML_TEMPERATURE_GPU)``
        (``nvidia-smi --query-gpu=temperature.gpu``)."""
        sensor = getattr(self._nvml, "NVML_TEMPERATURE_GPU", 0)
        temp = self._query("nvmlDeviceGetTemperature", handle, sensor)
        return None if temp is None else float(temp)

    def _power(self, handle: Any) -> float | None:
        """Board power in W: ``nvmlDeviceGetPowerUsage`` returns mW
        (``nvidia-smi --query-gpu=power.draw``)."""
        milliwatts = self._query("nvmlDeviceGetPowerUsage", handle)
        return None if milliwatts is None else milliwatts / 1000.0

    def _processes(self, handle: Any) -> tuple[GpuProcess, ...]:
        """Compute processes: ``nvmlDeviceGetComputeRunningProcesses``
        (``nvidia-smi --query-compute-apps=pid,used_memory``).

        ``usedGpuMemory`` is ``None`` where the driver cannot attribute memory
        (WDDM, some containers). The pids are in the host's pid namespace.
        """
        procs = self._query("nvmlDeviceGetComputeRunningProcesses", handle)
        if not procs:
            return ()
        by_pid: dict[int, int | None] = {}
        for proc in procs:
            used = getattr(proc, "usedGpuMemory", None)
            # One pid can appear once per context (e.g. MIG instances): add them up.
            before = by_pid.get(int(proc.pid), 0)
            if used is None or before is None:
                by_pid[int(proc.pid)] = None
            else:
                by_pid[int(proc.pid)] = before + int(used)
        return tuple(GpuProcess(pid, used) for pid, used in sorted(by_pid.items()))

    def _mig_mode(self, handle: Any) -> bool | None:
        """Current MIG mode: ``nvmlDeviceGetMigMode(h)[0]`` (``mig.mode.current``)."""
        modes = self._query("nvmlDeviceGetMigMode", handle)
        if not modes:
            return None
        return int(modes[0]) == _MIG_ENABLED

    def _nvlink_remote_bus_keys(self, handle: Any) -> list[str]:
        """PCI bus ids at the far end of each active NVLink: ``nvmlDeviceGetNvLinkState``
        then ``nvmlDeviceGetNvLinkRemotePciInfo`` per link (``nvidia-smi nvlink --status``).

        A GPU without NVLink answers ``NOT_SUPPORTED`` on link 0; we stop there
        rather than probing every link. NVSwitch systems report the switch as
        the remote end, which maps to no local GPU (no peers are inferred).
        """
        max_links = int(getattr(self._nvml, "NVML_NVLINK_MAX_LINKS", 18))
        remotes: list[str] = []
        for link in range(max_links):
            state = self._query("nvmlDeviceGetNvLinkState", handle, link)
            if state is None:
                if link == 0:
                    break
                continue  # links past the device's count answer an error too
            if int(state) != _NVLINK_ACTIVE:
                continue
            info = self._query("nvmlDeviceGetNvLinkRemotePciInfo", handle, link)
            key = None if info is None else _bus_key(getattr(info, "busId", None))
            if key is not None:
                remotes.append(key)
        return remotes

    # -- reading ---------------------------------------------------------------------

    def _open(self, index: int) -> _Device | None:
        """Handle and identity of one device; ``None`` when it cannot be identified."""
        try:
            handle = self._handle(index)
            uuid = None if handle is None else self._uuid(handle)
            if handle is None or uuid is None:
                return None
            bus_key = self._pci_bus_key(handle)
        except GpuLost:
            return None
        self._known_uuids[index] = uuid
        return _Device(index, handle, uuid, bus_key)

    def _unavailable(self, index: int) -> GpuReading:
        """A reading for a device that does not answer: identity kept, values unknown."""
        # A GPU never seen before still needs an id; this one cannot collide
        # with a real UUID ("GPU-..." / "MIG-...").
        uuid = self._known_uuids.get(index, GpuUuid(f"unknown-gpu-index-{index}"))
        self._util_history.pop(uuid, None)
        return GpuReading(
            index=index,
            uuid=uuid,
            name=None,
            memory_total_bytes=None,
            memory_used_bytes=None,
            memory_free_bytes=None,
            util_pct=None,
            memory_util_pct=None,
            temperature_c=None,
            power_w=None,
            mig_mode=None,
            available=False,
        )

    def _smoothed_util(self, uuid: GpuUuid, sample: float | None) -> float | None:
        """Mean of the last ``util_window`` samples; unknown if this sample is unknown.

        An unknown sample is not hidden behind stale history: a GPU that stops
        reporting utilization should not look idle (or busy) to placement.
        """
        if sample is None:
            return None
        history = self._util_history.setdefault(uuid, deque(maxlen=self._util_window))
        history.append(sample)
        return sum(history) / len(history)

    def _read_one(self, dev: _Device, peers_by_bus: dict[str, GpuUuid]) -> GpuReading:
        """Every value of one opened device; ``available=False`` if it is lost meanwhile."""
        try:
            total, used, free = self._memory(dev.handle)
            util, memory_util = self._utilization(dev.handle)
            peers = {
                peers_by_bus[key]
                for key in self._nvlink_remote_bus_keys(dev.handle)
                if key in peers_by_bus and peers_by_bus[key] != dev.uuid
            }
            return GpuReading(
                index=dev.index,
                uuid=dev.uuid,
                name=self._name(dev.handle),
                memory_total_bytes=total,
                memory_used_bytes=used,
                memory_free_bytes=free,
                util_pct=self._smoothed_util(dev.uuid, util),
                memory_util_pct=memory_util,
                temperature_c=self._temperature(dev.handle),
                power_w=self._power(dev.handle),
                processes=self._processes(dev.handle),
                mig_mode=self._mig_mode(dev.handle),
                nvlink_peers=tuple(sorted(peers)),
            )
        except GpuLost as exc:
            logger.debug("GPU %d (%s): %s", dev.index, dev.uuid, exc)
            return self._unavailable(dev.index)

    def read(self) -> tuple[GpuReading, ...]:
        """Sample every device, in NVML index order.

        Never raises for a failing device (it is marked ``available=False``);
        raises :class:`NvmlUnavailable` when NVML cannot start or stops working.
        """
        with self._lock:
            count = self.device_count()
            # Open all devices first: NVLink peers are named by the PCI bus id of
            # another local device, which must be known before mapping.
            devices = [self._open(index) for index in range(count)]
            peers_by_bus = {
                dev.bus_key: dev.uuid for dev in devices if dev is not None and dev.bus_key
            }
            readings = tuple(
                self._unavailable(index) if dev is None else self._read_one(dev, peers_by_bus)
                for index, dev in enumerate(devices)
            )
            # Log changes only: an agent samples every few seconds.
            lost = {r.index: r.uuid for r in readings if not r.available}
            for index in lost.keys() - self._lost:
                logger.warning(
                    "GPU %d (%s) stopped answering; reported unavailable", index, lost[index]
                )
            for index in self._lost - lost.keys():
                logger.info("GPU %d answers again", index)
            self._lost = set(lost)
            return readings
