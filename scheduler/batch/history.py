"""Job history for the predictor: each job's family, and the finished runs of every family.

:func:`family_keys` names a job's family, most specific first, as
:mod:`scheduler.core.predictor` expects. :class:`JobHistory` builds a
:class:`~scheduler.core.predictor.History` from the store's last succeeded
jobs (how long their attempts ran, queueing excluded) and, when it has a
:class:`~workers.interface.history.RunFactsReader`, the peak GPU memory their
MLflow runs measured. It refreshes off the reconcile loop, in its own thread:
the loop reads :attr:`JobHistory.latest` and never waits on the database or
MLflow for it.

Example::

    history = JobHistory(store, facts=None, refresh_s=30.0)
    history.start()
    prediction = predict(history.latest, family_keys(job))
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading

from scheduler.batch.store import JobRecord, JobStore
from scheduler.core.predictor import History, Run
from scheduler.core.states import JobState
from workers.interface.history import RunFacts, RunFactsReader

log = logging.getLogger(__name__)

# What a job's work is: two specs alike in these (whatever their name, size or priority)
# train the same model on the same data the same way.
_WORK_FIELDS = ("model", "entrypoint", "config", "data", "train")


def family_keys(job: JobRecord) -> tuple[str, ...]:
    """The job's family, most specific first: its name in its team (and submitter, when
    known), its work (model, data and train options) in its team, its team, the cluster.

    Pure. The work key is a stable hash of the spec without name, resources, priority,
    retries, tags and registration.
    """
    team = job.team
    work = job.spec.model_dump(mode="json", include=set(_WORK_FIELDS))
    digest = hashlib.sha256(json.dumps(work, sort_keys=True).encode()).hexdigest()[:12]
    who = f"{job.submitted_by}/" if job.submitted_by else ""
    return (f"name:{team}/{who}{job.name}", f"work:{team}/{digest}", f"team:{team}", "cluster")


def elapsed_s(job: JobRecord, now: float) -> float:
    """How long the job has run over all its attempts, the current one to ``now`` included."""
    current = 0.0
    if job.state is JobState.RUNNING and job.attempt_started_at is not None:
        current = max(0.0, now - job.attempt_started_at)
    return job.ran_s + current


class JobHistory:
    """The latest :class:`History` of succeeded jobs, refreshed every ``refresh_s`` in a
    daemon thread (:meth:`start`) or on demand (:meth:`refresh`).

    ``facts`` (None: durations only) adds each run's peak GPU memory; facts found are
    kept, so each finished run is asked about until MLflow answers for it. A refresh
    that fails is logged and the last history kept. ``limit``: how many of the most
    recent succeeded jobs are read; ``recent``: runs kept per family key.
    """

    def __init__(
        self,
        store: JobStore,
        facts: RunFactsReader | None = None,
        *,
        refresh_s: float = 30.0,
        limit: int = 5000,
        recent: int = 20,
    ) -> None:
        if refresh_s <= 0:
            raise ValueError(f"refresh_s must be positive, got {refresh_s}")
        self._store = store
        self._facts = facts
        self._refresh_s = refresh_s
        self._limit = limit
        self._recent = recent
        self._known: dict[str, RunFacts] = {}
        self._latest = History(recent=recent)
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def latest(self) -> History:
        """The history of the last refresh that succeeded (empty before the first)."""
        return self._latest

    def refresh(self) -> History:
        """Read the store (and MLflow) now; the new history becomes :attr:`latest`."""
        jobs = self._store.recent_finished(JobState.SUCCEEDED, self._limit)
        peaks = self._peaks([j.run_id for j in jobs if j.run_id])
        history = History(recent=self._recent)
        for job in jobs:
            if job.started_at is None or job.finished_at is None:
                continue
            history.add(
                Run(
                    keys=family_keys(job),
                    duration_s=job.ran_s,
                    finished_at=job.finished_at,
                    peak_gpu_memory_gb=peaks.get(job.run_id) if job.run_id else None,
                    predicted_s=job.predicted_s,
                )
            )
        self._latest = history
        return history

    def _peaks(self, run_ids: list[str]) -> dict[str, float]:
        if self._facts is not None:
            unknown = [r for r in run_ids if r not in self._known]
            if unknown:
                self._known.update(self._facts.read(unknown))
        self._known = {r: self._known[r] for r in run_ids if r in self._known}
        return {
            r: f.peak_gpu_memory_gb
            for r, f in self._known.items()
            if f.peak_gpu_memory_gb is not None
        }

    def start(self) -> None:
        """Refresh now and then every ``refresh_s``, in a daemon thread, until :meth:`stop`."""
        self._thread = threading.Thread(target=self._run, name="jobworker-history", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._halt.is_set():
            try:
                self.refresh()
            except Exception:
                log.exception("refreshing the job history failed; the last one is kept")
            self._halt.wait(self._refresh_s)
