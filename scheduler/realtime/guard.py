"""The SLO guard's runner: measures, asks the policy, throttles, records.

Every ``interval_s``, in its own thread (off the reconcile loop's path), it reads
each deployment's p99 over the last ``window_s`` (the router's measurements),
where its replicas run, and the running training jobs; the pure policy
(:mod:`scheduler.core.slo_guard`) says which jobs to throttle or release, and
the executor does it on every rank's node. Each throttle and release is
written to the job's store history (``jobworker status JOB`` and ``GET
/jobs/{id}`` show it), to its MLflow run through a
:class:`~workers.interface.throttles.ThrottleLog` (a tag with the count, a
metric point: 1 throttled, 0 released), and counted in ``/metrics``.

Example::

    guard = SloGuardRunner(store, controller, serving_metrics, executor, GuardSettings(),
                           metrics=scheduler_metrics, throttle_log=MlflowThrottleLog(uri))
    guard.start()   # ... guard.stop()
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from scheduler.batch.metrics import SchedulerMetrics
from scheduler.batch.store import JobStore
from scheduler.core.slo_guard import (
    DeploymentLatency,
    GuardSettings,
    GuardState,
    Release,
    Throttle,
    TrainingJob,
    guard,
)
from scheduler.core.states import JobState
from scheduler.realtime.metrics import ServingMetrics
from scheduler.realtime.spec import DeploymentSpec
from workers.interface.executor import Executor
from workers.interface.throttles import ThrottleLog

log = logging.getLogger(__name__)

THROTTLED = "throttled by the SLO guard"
"""How each throttle's history row starts (they are counted by it)."""


class SloGuardRunner:
    def __init__(
        self,
        store: JobStore,
        placed: Callable[[], Sequence[tuple[DeploymentSpec, frozenset[str]]]],
        serving: ServingMetrics,
        executor: Executor,
        settings: GuardSettings,
        *,
        metrics: SchedulerMetrics | None = None,
        throttle_log: ThrottleLog | None = None,
        interval_s: float = 0.5,
        window_s: float = 5.0,
        leading: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._placed = placed
        self._serving = serving
        self._executor = executor
        self._settings = settings
        self._metrics = metrics
        self._log = throttle_log
        self._interval_s = interval_s
        self._window_s = window_s
        self._clock = clock
        self._leading = leading
        self._released = False  # what an earlier control plane left throttled
        self._state = GuardState()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def throttled(self) -> frozenset[str]:
        """Jobs throttled now."""
        return frozenset(self._state.throttled)

    def tick(self) -> None:
        """One pass: measure, decide, act, record; nothing on a standby (not leading)."""
        if not self._leading():
            return
        if not self._released:  # the first pass as leader: a clean slate on the nodes
            for job in self._store.find([JobState.RUNNING]):
                self._executor.throttle(job.id, False)
            self._released = True
        deployments = [
            DeploymentLatency(
                spec.name,
                spec.team or "",
                self._serving.recent_p99_ms(spec.name, self._window_s),
                spec.slo.p99_ms,
                nodes,
            )
            for spec, nodes in self._placed()
        ]
        running = [
            j for j in self._store.find([JobState.RUNNING]) if j.preempt_reason is None
        ]  # a job being preempted is being stopped: never throttled
        jobs = [
            TrainingJob(j.id, j.team, frozenset(n.node_id for n in j.assignment.nodes))
            for j in running
            if j.assignment is not None and not j.cancel_requested
        ]
        decision, self._state = guard(deployments, jobs, self._state, self._settings, self._clock())
        teams = {j.id: j.team for j in running}
        runs = {j.id: j.run_id for j in running}
        for t in decision.throttle:
            self._act(t.job_id, True, _throttle_reason(t, self._settings), runs.get(t.job_id))
            if self._metrics is not None:
                self._metrics.throttled(teams.get(t.job_id, ""), t.deployment)
        for r in decision.release:
            self._act(r.job_id, False, _release_reason(r, self._settings), runs.get(r.job_id))
        if self._metrics is not None:
            self._metrics.throttled_now(len(self._state.throttled))

    def _act(self, job_id: str, paused: bool, reason: str, run_id: str | None) -> None:
        self._executor.throttle(job_id, paused)
        try:
            self._store.note(job_id, reason)
        except Exception:
            log.exception("could not record the throttle of %s", job_id)
        if self._log is not None and run_id is not None:
            count = sum(1 for e in self._store.history(job_id) if e.reason.startswith(THROTTLED))
            self._log.record(run_id, paused, count, time.time())

    def start(self) -> None:
        """Run every ``interval_s`` in a daemon thread until :meth:`stop`; the first pass
        as leader releases whatever an earlier control plane left throttled."""
        self._thread = threading.Thread(target=self._run, name="jobworker-slo-guard", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._log is not None:
            self._log.close()

    def _run(self) -> None:
        while not self._halt.wait(self._interval_s):
            try:
                self.tick()
            except Exception:
                log.exception("SLO guard pass failed; the next one tries again")


def _throttle_reason(t: Throttle, settings: GuardSettings) -> str:
    return (
        f"{THROTTLED}: deployment {t.deployment} p99 {t.p99_ms:.1f} ms over "
        f"{settings.throttle_at:.0%} of its slo.p99_ms {t.slo_p99_ms:g} ms on a node it shares"
    )


def _release_reason(r: Release, settings: GuardSettings) -> str:
    if r.expired:
        return (
            f"released by the SLO guard after {r.throttled_s:.0f} s, its longest throttle; "
            f"deployment {r.deployment} still over, but training runs {settings.rest_s:g} s "
            "before the next"
        )
    return (
        f"released by the SLO guard after {r.throttled_s:.1f} s: deployment {r.deployment} "
        f"p99 back under {settings.release_at:.0%} of its slo.p99_ms"
    )
