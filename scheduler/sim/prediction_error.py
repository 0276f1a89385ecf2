"""How far the predictions made at submission were off, over a replay.

Both figures are median absolute percentage errors (0.25: half the jobs were
predicted within 25 %), over the jobs that had a prediction:

* :func:`duration_mape`: the run time predicted at submission
  (``JobResult.predicted_duration_s``) against the trace's run time.
* :func:`start_mape`: the *wait* predicted at submission (forecast start
  less submit time, ``JobResult.predicted_start_s``) against the actual wait
  (first start less submit time). An error on absolute timestamps would
  shrink with the trace's epoch and mean nothing.

The denominator is the actual value but at least :data:`APE_FLOOR_S`, so a
job that starts at once and was predicted to, scores 0 rather than 0/0, and
one predicted to wait 10 minutes that started at once scores 10.

>>> from scheduler.sim.simulator import JobResult
>>> jobs = [JobResult("a", 1, 0.0, 50.0, 150.0, 100.0, 50.0, 0, 150.0, 110.0)]
>>> duration_mape(jobs), start_mape(jobs)
(0.5, 1.0)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from scheduler.sim.simulator import JobResult

APE_FLOOR_S = 60.0
"""The smallest denominator of an absolute percentage error, in seconds."""


def median_ape(pairs: Iterable[tuple[float, float]], floor_s: float = APE_FLOOR_S) -> float | None:
    """Median of ``|predicted - actual| / max(actual, floor_s)`` over (predicted, actual) pairs.

    None when there are none; an infinite prediction counts as an infinite error.

    >>> median_ape([(90.0, 100.0), (300.0, 100.0), (0.0, 0.0)])
    0.1
    """
    errors = sorted(abs(p - a) / max(a, floor_s) for p, a in pairs)
    if not errors:
        return None
    mid = len(errors) // 2
    return errors[mid] if len(errors) % 2 else (errors[mid - 1] + errors[mid]) / 2


def duration_mape(jobs: Sequence[JobResult]) -> float | None:
    """Median APE of the run times predicted at submission (module docstring)."""
    return median_ape(
        (j.predicted_duration_s, j.duration_s) for j in jobs if j.predicted_duration_s is not None
    )


def start_mape(jobs: Sequence[JobResult]) -> float | None:
    """Median APE of the waits predicted at submission (module docstring)."""
    return median_ape(
        (max(0.0, j.predicted_start_s - j.submit_s), j.first_start_s - j.submit_s)
        for j in jobs
        if j.predicted_start_s is not None
    )
