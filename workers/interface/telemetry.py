"""The telemetry interface: what a GPU backend reports, and the backend protocol.

The scheduler reads these values (through node agents) and never sees NVML
itself. An unknown value is ``None``; placement treats ``None`` as "not
eligible", never as zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NewType, Protocol

GIB = 2**30
"""Bytes in a GiB. Configs give memory in GB of 2**30 bytes, as GPU vendors label it
("A100 40GB" is 40 GiB); everything else counts bytes."""

GpuUuid = NewType("GpuUuid", str)
NodeId = NewType("NodeId", str)


@dataclass(frozen=True)
class GpuProcess:
    """A compute process on a GPU (``nvidia-smi --query-compute-apps``)."""

    pid: int
    used_memory_bytes: int | None


@dataclass(frozen=True)
class GpuReading:
    """One device at one instant. ``index`` is only for ``CUDA_VISIBLE_DEVICES``."""

    index: int
    uuid: GpuUuid
    name: str | None
    memory_total_bytes: int | None
    memory_used_bytes: int | None
    memory_free_bytes: int | None
    util_pct: float | None  # smoothed over the backend's window
    memory_util_pct: float | None
    temperature_c: float | None
    power_w: float | None
    processes: tuple[GpuProcess, ...] = ()
    mig_mode: bool | None = None
    nvlink_peers: tuple[GpuUuid, ...] = ()
    available: bool = True


@dataclass(frozen=True)
class NodeReading:
    """A node's resources and GPUs, as its agent sampled them."""

    node_id: NodeId
    hostname: str
    cpus: int
    memory_total_bytes: int
    gpus: tuple[GpuReading, ...]
    backend: str  # "nvml" or "simulated"
    sampled_at: float  # unix seconds, set by the agent


class GpuBackend(Protocol):
    """A source of GPU readings: NVML on real hardware, or the simulator."""

    name: str

    def read(self) -> tuple[GpuReading, ...]:
        """Sample every device. Never raises for a failing device: marks it instead."""
        ...

    def close(self) -> None:
        """Release the library handle (``nvmlShutdown``)."""
        ...
