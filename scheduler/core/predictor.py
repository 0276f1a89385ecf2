"""Predict a job's run time and peak GPU memory from the runs of its family that ended before it.

A job's *family* is a tuple of keys, most specific first, that the caller
builds from what it knows about the job. The live loop uses, for example::

    ("name:vision/resnet-sweep", "config:9f2c41", "team:vision", "cluster")

and the trace simulator, which knows only a job's virtual cluster and size::

    ("vc:6c71a0/gpus:4", "vc:6c71a0", "cluster")

:class:`History` keeps, for every key, the last ``recent`` finished runs that
carried it. :func:`predict` answers from the first key of the family with
enough samples (one for the most specific key: the same job run again; else
``min_samples``), so a job with no history of its own falls back to its
team's and then the cluster's. The prediction is the median of those runs
with their quartiles as the uncertainty; peak memory is the largest of them,
since a job placed on less than its peak fails.

:func:`remaining_s` conditions on how long a job has already run: a job
that outlived most of its family is likely one of the long ones.

Pure: no clock, no I/O; the caller passes times and adds runs in the order
they finished.

>>> h = History()
>>> for d in (100.0, 120.0, 140.0):
...     h.add(Run(("name:a", "team:t"), duration_s=d, finished_at=d, peak_gpu_memory_gb=10.0))
>>> p = predict(h, ("name:a", "team:t"))
>>> (p.duration_s, p.low_s, p.high_s, p.basis, p.samples, p.peak_gpu_memory_gb)
(120.0, 110.0, 130.0, 'name:a', 3, 10.0)
>>> predict(h, ("name:b", "team:t")).basis
'team:t'
>>> predict(h, ("name:b", "team:u")) is None
True
>>> remaining_s(h, ("name:a",), elapsed_s=125.0)
15.0
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

ERROR_FLOOR_S = 60.0
"""The smallest denominator of a prediction's relative error: a 10 s job predicted at 20 s
is not 100 % off for a scheduler."""


@dataclass(frozen=True, slots=True)
class Run:
    """One finished run: its family's keys, how long it ran, when it ended, its peak memory,
    and the run time predicted for it when it was submitted (``predicted_s``), if any."""

    keys: tuple[str, ...]
    duration_s: float
    finished_at: float
    peak_gpu_memory_gb: float | None = None
    predicted_s: float | None = None


@dataclass(frozen=True, slots=True)
class Prediction:
    """A predicted run time (median, with quartiles ``low_s``..``high_s``) and peak memory.

    ``basis`` is the family key the samples came from; ``samples`` how many;
    ``durations_s`` their run times, ascending (empty when built by hand),
    frozen with the prediction so that :meth:`remaining_s` later conditions
    on the history known when it was made. ``error``: how far off the
    predictions made for that key's recent runs were, the median of
    ``|predicted - actual| / max(actual, ERROR_FLOOR_S)`` (None: fewer than
    ``min_samples`` of them were predicted): how much to trust this one.

    >>> Prediction(600.0, 500.0, 900.0, None, "team:t", 4).spread_s
    200.0
    """

    duration_s: float
    low_s: float
    high_s: float
    peak_gpu_memory_gb: float | None
    basis: str
    samples: int
    durations_s: tuple[float, ...] = ()
    error: float | None = None

    @property
    def spread_s(self) -> float:
        """Half the interquartile range: the ``±`` a user is shown."""
        return (self.high_s - self.low_s) / 2

    def remaining_s(self, elapsed_s: float) -> float:
        """Run time left after ``elapsed_s``, from this prediction's samples
        (see :func:`remaining_s`); without samples, ``duration_s`` less the elapsed time,
        or as long again once past it.

        >>> p = predict(History([Run(("k",), d, d) for d in (60.0, 100.0, 200.0)]), ("k",))
        >>> p.remaining_s(0.0), p.remaining_s(80.0), p.remaining_s(300.0)
        (100.0, 70.0, 300.0)
        """
        longer = [d for d in self.durations_s or (self.duration_s,) if d > elapsed_s]
        if not longer:
            return max(elapsed_s, 1.0)
        return _quantile(longer, 0.5) - elapsed_s


class History:
    """The last ``recent`` finished runs per family key (a data structure, not a policy)."""

    def __init__(self, runs: Iterable[Run] = (), *, recent: int = 20) -> None:
        if recent < 1:
            raise ValueError(f"recent must be at least 1, got {recent}")
        self.recent = recent
        self._by_key: dict[str, deque[Run]] = {}
        for run in runs:
            self.add(run)

    def add(self, run: Run) -> None:
        """Record a finished run under each of its keys (oldest beyond ``recent`` drops out)."""
        if not run.duration_s >= 0:
            raise ValueError(f"a run's duration must be a non-negative number: {run.duration_s}")
        for key in run.keys:
            runs = self._by_key.get(key)
            if runs is None:
                runs = self._by_key[key] = deque(maxlen=self.recent)
            runs.append(run)

    def runs(self, key: str) -> tuple[Run, ...]:
        """The recent runs that carried ``key``, oldest first."""
        return tuple(self._by_key.get(key, ()))


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (``ordered`` ascending, non-empty)."""
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _basis(history: History, keys: Sequence[str], min_samples: int) -> tuple[str, tuple[Run, ...]]:
    for i, key in enumerate(keys):
        runs = history.runs(key)
        if runs and len(runs) >= (1 if i == 0 else min_samples):
            return key, runs
    return "", ()


def past_error(runs: Iterable[Run], *, min_samples: int = 3) -> float | None:
    """Median relative error of the predictions made for ``runs`` (None: fewer than
    ``min_samples`` were predicted); the denominator is floored at :data:`ERROR_FLOOR_S`.

    >>> past_error([Run(("k",), 100.0, 1.0, predicted_s=p) for p in (90.0, 150.0, None, 100.0)])
    0.1
    """
    errors = sorted(
        abs(r.predicted_s - r.duration_s) / max(r.duration_s, ERROR_FLOOR_S)
        for r in runs
        if r.predicted_s is not None
    )
    if not errors or len(errors) < min_samples:
        return None
    return _quantile(errors, 0.5)


def predict(history: History, keys: Sequence[str], *, min_samples: int = 3) -> Prediction | None:
    """The family's prediction from its most specific key with enough runs, or None."""
    basis, runs = _basis(history, keys, min_samples)
    if not runs:
        return None
    durations = sorted(r.duration_s for r in runs)
    peaks = [r.peak_gpu_memory_gb for r in runs if r.peak_gpu_memory_gb is not None]
    return Prediction(
        duration_s=_quantile(durations, 0.5),
        low_s=_quantile(durations, 0.25),
        high_s=_quantile(durations, 0.75),
        peak_gpu_memory_gb=max(peaks) if peaks else None,
        basis=basis,
        samples=len(runs),
        durations_s=tuple(durations),
        error=past_error(runs, min_samples=min_samples),
    )


def remaining_s(
    history: History, keys: Sequence[str], elapsed_s: float, *, min_samples: int = 3
) -> float | None:
    """Predicted run time left after ``elapsed_s``: the median of the family's runs longer
    than that, less ``elapsed_s``; once it outlived them all, as long again. None: no history.

    >>> h = History([Run(("k",), 60.0, 60.0)])
    >>> remaining_s(h, ("k",), 0.0), remaining_s(h, ("k",), 90.0)
    (60.0, 90.0)
    """
    prediction = predict(history, keys, min_samples=min_samples)
    return None if prediction is None else prediction.remaining_s(elapsed_s)
