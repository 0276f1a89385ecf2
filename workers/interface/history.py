"""The run-history interface: what the tracking server knows about a job's finished runs.

The control plane learns a family's durations from its own job store; the
facts only the run itself measured (its peak GPU memory, how fast it
stepped) come from MLflow through a :class:`RunFactsReader`
(``workers/mlflow_history.py`` implements it). An unknown value is ``None``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

PEAK_GPU_MEMORY_TAG = "jobworker.peak_gpu_memory_gb"
"""Run tag: the job's peak GPU memory on any one GPU (GiB), as the job process measured it."""
ACTUAL_DURATION_TAG = "jobworker.actual_duration_s"
"""Run tag: the job's run time (seconds, summed over its attempts), tagged at each end."""


@dataclass(frozen=True, slots=True)
class RunFacts:
    """What one finished run measured.

    ``peak_gpu_memory_gb`` is the run's peak GPU memory per GPU (GiB, the
    largest over its GPUs), ``steps_per_s`` its training steps per second
    over the run; ``None`` where the run did not record it.

    Example::

        RunFacts(run_id="3f1c…", peak_gpu_memory_gb=7.5, steps_per_s=12.0)
    """

    run_id: str
    peak_gpu_memory_gb: float | None
    steps_per_s: float | None


class RunFactsReader(Protocol):
    """Reads :class:`RunFacts` of finished runs by MLflow run id."""

    def read(self, run_ids: Sequence[str]) -> Mapping[str, RunFacts]:
        """The facts of each run found; a run id missing from the answer is unknown.

        Never raises for a tracking-server outage: it logs it and returns what it has.
        """
        ...
