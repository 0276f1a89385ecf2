"""The throttle-log interface: how the SLO guard records a throttle on a job's MLflow run.

``workers/mlflow_throttles.py`` implements it. Per run, the tag :data:`THROTTLES_TAG`
holds how many times the job has been throttled, and the metric
:data:`THROTTLED_METRIC` has one point per throttle (1) and per release (0).
"""

from __future__ import annotations

from typing import Protocol

THROTTLES_TAG = "jobworker.throttles"
THROTTLED_METRIC = "jobworker/throttled"


class ThrottleLog(Protocol):
    def record(self, run_id: str, throttled: bool, throttles: int, at_s: float) -> None:
        """Queue one throttle (``throttled``) or release at unix time ``at_s``; ``throttles``
        is the job's count so far. Returns at once: writes happen off the caller's thread."""
        ...

    def close(self) -> None:
        """Write what is queued, then stop."""
        ...
