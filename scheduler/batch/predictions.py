"""Predicted start and finish of every pending and running job, forecast off the loop.

Each pass the reconcile loop hands a :class:`Forecaster` what it planned with
(the waiting jobs, the running ones, the GPUs per node, the policy) and each
job's predicted run time; the forecaster simulates the queue forward
(:func:`scheduler.sim.forecast.forecast`, the simulator's own engine) from the
latest of those inputs, no more often than every ``every_s``, and keeps one
:class:`JobPrediction` per job. Readers (``GET /queue``, ``GET /jobs/{id}``)
take the latest; neither the loop nor a reader waits for a forecast. The
forecast runs in a worker process, started at the first forecast (while no
job has a prediction there is nothing to forecast, and no process): a long queue
takes seconds of pure Python, which in a thread would hold the interpreter lock
against the loop; and it rests at least as long as it worked, so it never takes
more than half a core.

Example::

    forecaster = Forecaster(every_s=2.0)
    forecaster.start()
    forecaster.submit(inputs)            # from the loop, after a pass
    forecaster.prediction("j-2026...")   # JobPrediction or None
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.pool import Pool

from scheduler.core.model import QueuedJob, QueuePolicy, RunningJob
from scheduler.core.predictor import Prediction
from scheduler.sim.forecast import forecast

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class JobPrediction:
    """What the scheduler expects of one job; None where it has no estimate.

    ``start_at``: a pending job's predicted start (a running job's current
    attempt's start); ``end_at`` its predicted end; ``duration_s`` its
    predicted total run time and ``remaining_s`` what is left of it;
    ``spread_s`` the ``±`` of the duration (half its interquartile range);
    ``basis`` the family key the estimate came from, ``samples`` how many
    finished runs it rests on (0: none; its start may still be known, from the
    jobs before it). A start or end beyond the forecast's horizon is None.
    """

    start_at: float | None
    end_at: float | None
    duration_s: float | None
    remaining_s: float | None
    spread_s: float | None
    basis: str | None
    samples: int


@dataclass(frozen=True, slots=True)
class ForecastInputs:
    """One pass's view: what the queue policy planned with, and each job's prediction."""

    pending: Sequence[QueuedJob]
    running: Sequence[RunningJob]
    node_gpus: Mapping[str, int]
    policy: QueuePolicy
    now: float
    started_at: Mapping[str, float]  # every scheduled or running job: its attempt's start
    predictions: Mapping[str, Prediction]  # jobs with history only
    remaining_s: Mapping[str, float]  # jobs with history only
    unknown_s: float | None  # run time assumed for the others: the cluster's median


def _finite(t: float | None) -> float | None:
    return t if t is not None and math.isfinite(t) else None


def job_predictions(inputs: ForecastInputs) -> dict[str, JobPrediction]:
    """Every pending and running job of ``inputs``, with its forecast start and end.

    A running job's end is its forecast one (the forecast charges a preemption it
    foresees), else, when it holds no GPU, now plus its predicted run time left.
    Nothing is forecast while no job has a prediction: every time would be a guess.
    """
    times = {}
    if inputs.remaining_s:
        extra = {} if inputs.unknown_s is None else {"unknown_s": inputs.unknown_s}
        times = forecast(
            inputs.pending,
            inputs.running,
            inputs.node_gpus,
            inputs.policy,
            inputs.now,
            inputs.remaining_s,
            **extra,
        )
    out: dict[str, JobPrediction] = {}
    started = inputs.started_at
    for job_id in [*(j.job_id for j in inputs.pending), *started]:
        p = inputs.predictions.get(job_id)
        left_s = inputs.remaining_s.get(job_id)
        f = times.get(job_id)
        end_at = f.end_at if f is not None else None
        if end_at is None and left_s is not None and job_id in started:
            end_at = inputs.now + left_s
        out[job_id] = JobPrediction(
            start_at=_finite(started.get(job_id, f.start_at if f is not None else None)),
            end_at=_finite(end_at) if p is not None else None,
            duration_s=p.duration_s if p is not None else None,
            remaining_s=left_s,
            spread_s=p.spread_s if p is not None else None,
            basis=p.basis if p is not None else None,
            samples=p.samples if p is not None else 0,
        )
    return out


class Forecaster:
    """Forecasts the latest inputs, at most once per ``every_s``: :meth:`start` runs a
    daemon thread that hands them to a worker process; :meth:`run_once`, inline.

    The process is spawned, not forked: a fork of a process with Ray's threads may
    inherit their locks held.
    """

    def __init__(self, every_s: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._every_s = every_s
        self._clock = clock
        self._inputs: ForecastInputs | None = None
        self._latest: dict[str, JobPrediction] = {}
        self._ready = threading.Event()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: Pool | None = None

    def submit(self, inputs: ForecastInputs) -> None:
        """Forecast these next (replacing inputs not yet forecast)."""
        self._inputs = inputs
        self._ready.set()

    def prediction(self, job_id: str) -> JobPrediction | None:
        return self._latest.get(job_id)

    def predictions(self) -> Mapping[str, JobPrediction]:
        return self._latest

    def run_once(self) -> None:
        """Forecast the latest inputs now, here."""
        inputs, self._inputs = self._inputs, None
        if inputs is not None:
            self._latest = job_predictions(inputs)

    def _run_in_worker(self) -> None:
        inputs, self._inputs = self._inputs, None
        if inputs is None:
            return
        if not inputs.remaining_s:  # nothing to forecast: no process for that
            self._latest = job_predictions(inputs)
            return
        if self._pool is None:
            self._pool = multiprocessing.get_context("spawn").Pool(1)
        result = self._pool.apply_async(job_predictions, (inputs,))
        while not result.ready():
            if self._halt.is_set():
                return
            result.wait(0.2)
        self._latest = result.get()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="jobworker-forecast", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and end the worker process, a forecast in progress with it."""
        self._halt.set()
        self._ready.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()

    def _run(self) -> None:
        while not self._halt.is_set():
            self._ready.wait()
            self._ready.clear()
            if self._halt.is_set():
                return
            began = self._clock()
            try:
                self._run_in_worker()
            except Exception:
                log.exception("forecasting the queue failed; the last forecast is kept")
            took_s = self._clock() - began
            self._halt.wait(max(self._every_s - took_s, took_s))
