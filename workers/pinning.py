"""The environment that pins a job process or a replica to its GPUs and CPU threads.

The scheduler, not Ray's logical GPU counts, owns GPU assignment: a process
sees exactly the GPUs it was given through ``CUDA_VISIBLE_DEVICES``, which
must be set before CUDA starts (before torch is imported, to be safe).
Stdlib only: cheap to import in an actor.
"""

from __future__ import annotations

from collections.abc import Sequence


def pinned_env(gpu_indices: Sequence[int], cpus: float) -> dict[str, str]:
    """Variables for a process that may use ``gpu_indices`` (NVML/PCI order) and ``cpus`` threads.

    >>> pinned_env([1, 3], 2)["CUDA_VISIBLE_DEVICES"]
    '1,3'
    """
    threads = str(max(1, int(cpus)))
    return {
        # NVML numbers GPUs in PCI bus order; CUDA must use the same order.
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in gpu_indices),
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
    }
