"""The in-process half of an enforced GPU memory cap: torch's per-process memory fraction.

The job process (``workers.job_runner``) and the inference replica call
:func:`limit_gpu_memory` before the program allocates anything, with the bytes
per GPU the scheduler decided; the node agent's watchdog
(:mod:`workers.memory_caps`) is the other half. It works whether or not CUDA is
initialised yet (a warm job process may have imported torch long before), as
long as nothing was allocated beyond the cap before the call.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pydantic stays out of bench/gpu_check.py's child process
    from workers.interface.executor import LaunchRequest

SIM_USAGE_DIR_ENV = "JOBWORKER_SIM_USAGE_DIR"
"""Where a job process on simulated GPUs may declare what it really holds
(``workers.sim_backend.write_usage(dir, job_id, os.getpid(), gpus, bytes)``)."""


def limit_gpu_memory(cap_bytes_per_gpu: int | None) -> list[float]:
    """Cap torch's caching allocator at ``cap_bytes_per_gpu`` on every visible GPU
    (``torch.cuda.set_per_process_memory_fraction(cap / device total, device)``).

    An allocation beyond it raises ``torch.cuda.OutOfMemoryError`` in the program, as
    on a GPU of that size. No cap (``None`` or 0: a job that asked for whole GPUs) or
    no CUDA: nothing is set. Returns the fraction set per visible device.
    """
    if not cap_bytes_per_gpu or not torch.cuda.is_available():
        return []
    fractions = []
    for device in range(torch.cuda.device_count()):
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = min(1.0, cap_bytes_per_gpu / total)
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        fractions.append(fraction)
    return fractions


def cap_job_process(launch: LaunchRequest) -> None:
    """In the job process, before the program runs: cap its GPU memory at what the
    scheduler gave it, and on simulated GPUs tell it where to declare what it holds
    (``$JOBWORKER_SIM_USAGE_DIR``), as a real process's memory would show in NVML."""
    limit_gpu_memory(launch.node.held_gpu_memory_bytes(launch.spec) or None)
    if launch.simulated_usage_dir:
        os.environ[SIM_USAGE_DIR_ENV] = launch.simulated_usage_dir
