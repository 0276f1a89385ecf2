"""``resources.gpu_memory_gb: auto``: a job's GPU memory request sized from its history.

A job that opts in asks, on each GPU, for the peak GPU memory its family's
earlier runs measured (the prediction's ``peak_gpu_memory_gb``, the largest
of the runs it is based on) plus :data:`AUTO_MARGIN`, rounded up to a
multiple of :data:`AUTO_STEP_GB`. With no such run it asks for the whole
GPU: placement takes any GPU no other job holds (as for every training job)
and the job holds all the memory that GPU had free. A number the user wrote
is never changed: only ``auto`` comes here.

Pure: the caller passes the job's prediction (``scheduler.core.predictor``).

>>> from scheduler.core.predictor import Prediction
>>> auto_gpu_memory(Prediction(600.0, 500.0, 700.0, 9.3, "name:resnet", 4)).gpu_memory_gb
10.5
>>> auto_gpu_memory(None).reason
'gpu_memory_gb: auto — no finished runs of this family yet, asking for the whole GPU'
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scheduler.core.predictor import Prediction
from workers.interface.telemetry import GIB

AUTO_MARGIN = 0.10
"""Added to the measured peak: allocator growth, another batch size, the CUDA context."""
AUTO_STEP_GB = 0.5
"""Requests are rounded up to a multiple of this (GiB), so that small jitter in the
measured peak does not make a new request shape every run."""


@dataclass(frozen=True, slots=True)
class AutoGpuMemory:
    """What an ``auto`` job asks for on each GPU, and why, in words for its status.

    ``gpu_memory_gb`` is None for the whole GPU.
    """

    gpu_memory_gb: float | None
    reason: str

    @property
    def gpu_memory_bytes(self) -> int:
        """The free memory placement requires on each GPU (0 for the whole GPU: any GPU
        no other job holds; what the job then holds is the GPU's free memory)."""
        return 0 if self.gpu_memory_gb is None else int(self.gpu_memory_gb * GIB)


def auto_gpu_memory(prediction: Prediction | None) -> AutoGpuMemory:
    """The request of an ``auto`` job whose prediction is ``prediction`` (None: no history)."""
    if prediction is None:
        return AutoGpuMemory(
            None,
            "gpu_memory_gb: auto — no finished runs of this family yet, asking for the whole GPU",
        )
    runs = f"{prediction.samples} run{'s' if prediction.samples != 1 else ''} of {prediction.basis}"
    peak_gb = prediction.peak_gpu_memory_gb
    if peak_gb is None:
        return AutoGpuMemory(
            None,
            f"gpu_memory_gb: auto — no peak GPU memory measured in the last {runs}, "
            "asking for the whole GPU",
        )
    steps = math.ceil(round(peak_gb * (1 + AUTO_MARGIN) / AUTO_STEP_GB, 9))
    gb = max(1, steps) * AUTO_STEP_GB
    return AutoGpuMemory(
        gb,
        f"gpu_memory_gb: auto — asking for {gb:g} GiB per GPU: peak {peak_gb:.1f} GiB "
        f"in the last {runs}, +{AUTO_MARGIN:.0%}",
    )
